"""A minimal HTTP/1.1 server for local status (loopback TCP and a Unix socket).

Routes (pure, :func:`route`): ``/healthz/ready`` (200 or 503 with the reasons), ``/status``
(the JSON state document), ``/debug/ndsz`` (the current name table, as Istio's agent serves:
from the server's async ``ndsz`` source when it has one, which renders it off the event loop, a
100k-entry table being ~13 MB of JSON; else from the state's ``name_table``); ``/status?v=1``
(the stable schema of docs/status.md, :func:`vmagent.status.view.status_v1`) and
``/stats/prometheus`` (from the server's async ``metrics`` source, when it has one)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

from vmagent.status.view import status_v1

log = logging.getLogger("vmagent.status")

StateSource = Callable[[], Mapping[str, Any]]
DocumentSource = Callable[[], AsyncGenerator[bytes, None]]  # a JSON document, encoded, in pieces
MetricsSource = Callable[[], Awaitable[bytes]]  # Prometheus text exposition, encoded
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def route(
    method: str, path: str, state: StateSource, now: float | None = None
) -> tuple[int, str, bytes]:
    """(status, content type, body) for one request; ``now`` (wall-clock seconds) dates the
    ``?v=1`` view."""
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"only GET\n"
    path, _, query = path.partition("?")
    if path == "/healthz/ready":
        doc = state()
        reasons = list(doc.get("not_ready", []))
        if reasons:
            return 503, "text/plain", ("not ready: " + "; ".join(reasons) + "\n").encode()
        return 200, "text/plain", b"ready\n"
    if path == "/status":
        doc = state()
        if "v=1" in query.split("&"):
            doc = status_v1(doc, time.time() if now is None else now)
        body = json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"
        return 200, "application/json", body.encode()
    if path == "/debug/ndsz":
        doc = state()
        body = json.dumps(doc.get("name_table", {}), indent=2, sort_keys=True) + "\n"
        return 200, "application/json", body.encode()
    return 404, "text/plain", b"not found: try /healthz/ready, /status, /debug/ndsz\n"


class StatusServer:
    def __init__(
        self,
        state: StateSource,
        ndsz: DocumentSource | None = None,
        metrics: MetricsSource | None = None,
    ) -> None:
        self._state = state
        self._ndsz = ndsz
        self._metrics = metrics
        self._servers: list[asyncio.base_events.Server] = []

    async def listen_tcp(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self._servers.append(server)
        log.info("status: http://%s:%d/status", host, port)

    async def listen_unix(self, path: str) -> None:
        """Serve on the Unix socket ``path``; a stale socket file is replaced, but one that a
        live process answers on raises OSError(EADDRINUSE): taking it over would leave two
        agents sharing one run directory, and ``vmagent status`` talking to the wrong one."""
        if await _answers(path):
            raise OSError(
                errno.EADDRINUSE,
                f"another process is serving on {path}; is another vmagent using this"
                " VMAGENT_RUN_DIR? Give each agent its own VMAGENT_RUN_DIR",
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket from an earlier run
        server = await asyncio.start_unix_server(self._serve, path)
        os.chmod(path, 0o660)
        self._servers.append(server)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            if len(head) > MAX_REQUEST_HEAD:
                raise ValueError("request head too large")
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if self._ndsz is not None and method in ("GET", "HEAD") and _is_ndsz(path):
                await self._stream(writer, method, self._ndsz())
                return
            if self._metrics is not None and path.split("?", 1)[0] == "/stats/prometheus":
                status, content_type, body = 200, PROMETHEUS_TYPE, await self._metrics()
            else:
                status, content_type, body = route(method, path, self._state, time.time())
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        except ValueError:
            status, content_type, body = 400, "text/plain", b"bad request\n"
            method = "GET"
        reason = _REASONS.get(status, "Bad Request")
        head_out = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head_out if method == "HEAD" else head_out + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _stream(
        self, writer: asyncio.StreamWriter, method: str, pieces: AsyncGenerator[bytes, None]
    ) -> None:
        """A 200 JSON answer of unknown length (it ends when the connection closes), written
        piece by piece as ``pieces`` gives them: a 100k-entry table is never whole here."""
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        )
        try:
            if method != "HEAD":
                async for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
            else:
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            await pieces.aclose()
            writer.close()


def _is_ndsz(path: str) -> bool:
    return path.split("?", 1)[0] == "/debug/ndsz"


async def _answers(path: str) -> bool:
    """Whether something accepts connections on the Unix socket ``path`` (1 s at most)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False  # absent, refused (stale file), or not a socket
    writer.close()
    return True
