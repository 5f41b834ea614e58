"""Python 3.10 support: asyncio.TaskGroup and asyncio.timeout arrived in 3.11."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import TaskGroup
else:  # pragma: no cover - exercised on 3.10 only
    from taskgroup import TaskGroup

__all__ = ["TaskGroup"]
