"""The open connections of one ``asyncio.start_server``, so a server can end them when it stops.

Why: ``Server.close()`` stops accepting but leaves running handlers alone (Python 3.11), and
``asyncio.run`` then cancels them at exit; Python 3.11's stream protocol reports a cancelled
handler as "Exception in callback ... CancelledError" with a traceback. Tracked handlers are
closed by :meth:`Connections.close` and end quietly when cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Connections:
    def __init__(self) -> None:
        self._open: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    def __len__(self) -> int:
        return len(self._open)

    def track(self, handler: Handler) -> Handler:
        """``handler`` for ``asyncio.start_server``, recorded while it runs."""

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task: asyncio.Task[Any] | None = asyncio.current_task()
            if task is not None:
                self._open[task] = writer
            try:
                await handler(reader, writer)
            except (asyncio.CancelledError, ConnectionError):
                pass  # stopping, or the peer left: nothing to report
            finally:
                if task is not None:
                    self._open.pop(task, None)
                writer.close()

        return tracked

    async def close(self, timeout: float = 2.0) -> None:
        """Close every open connection and wait (at most ``timeout`` seconds) for the
        handlers to end."""
        tasks = list(self._open)
        for task, writer in list(self._open.items()):
            writer.close()
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
