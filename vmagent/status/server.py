"""A minimal HTTP/1.1 server for local status (loopback TCP and a Unix socket).

Routes (pure, :func:`route`): ``/healthz/ready`` (200 or 503 with the reasons), ``/status``
(the JSON state document), ``/debug/ndsz`` (the current name table, as Istio's agent serves)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("vmagent.status")

StateSource = Callable[[], Mapping[str, Any]]
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def route(method: str, path: str, state: StateSource) -> tuple[int, str, bytes]:
    """(status, content type, body) for one request."""
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"only GET\n"
    path = path.split("?", 1)[0]
    if path == "/healthz/ready":
        doc = state()
        reasons = list(doc.get("not_ready", []))
        if reasons:
            return 503, "text/plain", ("not ready: " + "; ".join(reasons) + "\n").encode()
        return 200, "text/plain", b"ready\n"
    if path == "/status":
        body = json.dumps(state(), indent=2, sort_keys=True, default=str) + "\n"
        return 200, "application/json", body.encode()
    if path == "/debug/ndsz":
        doc = state()
        body = json.dumps(doc.get("name_table", {}), indent=2, sort_keys=True) + "\n"
        return 200, "application/json", body.encode()
    return 404, "text/plain", b"not found: try /healthz/ready, /status, /debug/ndsz\n"


class StatusServer:
    def __init__(self, state: StateSource) -> None:
        self._state = state
        self._servers: list[asyncio.base_events.Server] = []

    async def listen_tcp(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self._servers.append(server)
        log.info("status: http://%s:%d/status", host, port)

    async def listen_unix(self, path: str) -> None:
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
            status, content_type, body = route(method, path, self._state)
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
