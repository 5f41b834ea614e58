"""The control plane's debug HTTP endpoints (JSON, loopback, HTTP/1.1 with ``Connection:
close``), in the spirit of istiod's ``:8080/debug/*``:

- ``GET /debug/registry``: WorkloadEntries (with health conditions) and WorkloadGroups
- ``GET /debug/ndsz?proxy=<node id, name, name.namespace, IP or stream>``: each matching
  proxy's current NameTable and its NDS ACK/NACK state (``proxyID=`` works too)
- ``GET /debug/connections``: the xDS streams, their nodes, watches, ACKs and NACKs
- ``GET /debug/config``: the loaded mesh config and the last reload error
- ``POST /debug/push-malformed?proxy=<...>&kind=bytes|ips``: test hook, pushes a malformed
  NameTable to the matching NDS streams (the agent should NACK it)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

from vmagent.devmesh.ads import MALFORMED_KINDS, AdsServicer
from vmagent.devmesh.connections import Connections
from vmagent.devmesh.state import MeshState

log = logging.getLogger(__name__)

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def route(
    state: MeshState, ads: AdsServicer, method: str, target: str
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) for one request; pure apart from the test hook's push."""
    url = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    proxy = query.get("proxy", query.get("proxyID", ""))
    path = url.path.rstrip("/") or "/"
    views = {
        "/debug/registry": state.registry_view,
        "/debug/connections": state.connections_view,
        "/debug/config": state.config_view,
    }
    if path == "/debug/push-malformed":
        if method != "POST":
            return 405, {"error": "use POST"}
        kind = query.get("kind", "bytes")
        if kind not in MALFORMED_KINDS:
            return 400, {"error": f"kind must be one of {', '.join(MALFORMED_KINDS)}"}
        streams = ads.push_malformed(proxy, kind)
        if not streams:
            return 404, {"error": f"no NDS stream matches proxy={proxy!r}"}
        return 200, {"pushed": streams, "kind": kind}
    if method != "GET":
        return 405, {"error": "use GET"}
    if path in views:
        return 200, views[path]()
    if path == "/debug/ndsz":
        view = state.ndsz_view(proxy)
        if proxy and not view["proxies"]:
            return 404, {"error": f"no connected proxy matches {proxy!r}"}
        return 200, view
    if path in ("/", "/debug"):
        return 200, {"endpoints": [*views, "/debug/ndsz", "/debug/push-malformed (POST)"]}
    return 404, {"error": f"no such endpoint {url.path}"}


class DebugServer:
    def __init__(self, state: MeshState, ads: AdsServicer) -> None:
        self.state = state
        self.ads = ads
        self._server: asyncio.AbstractServer | None = None
        self._connections = Connections()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._connections.track(self._handle), host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._connections.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, body = route(self.state, self.ads, method, target)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, body = 400, {"error": "bad request"}
        except asyncio.TimeoutError:
            writer.close()
            return
        except Exception as exc:  # a debug view must never take the server down
            log.exception("debug endpoint failed")
            status, body = 500, {"error": str(exc)}
        data = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
        writer.write(
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
