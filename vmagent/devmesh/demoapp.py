"""The demo app ``vmagent dev`` runs as the VM's workload: a tiny HTTP/1.1 server on loopback.

- ``GET /whoami`` answers JSON ``{"app", "peer", "x-forwarded-client-cert"}``: ``peer`` is
  the caller's SPIFFE ID as the sidecar's inbound listener saw it (the ``URI=`` of the last
  element of ``x-forwarded-client-cert``, the one this hop's Envoy set), ``null`` when the
  request did not come through Envoy with mTLS.
- Anything else (the WorkloadGroup's readiness probe, ``/healthz``) answers
  ``hello from <ns>/<group>``.

Keep-alive as HTTP/1.1 says, so Envoy reuses its upstream connections under load. Requests
with a body are not expected (the body is not read; the connection is closed after them)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from vmagent.devmesh.connections import Connections
from vmagent.devmesh.server import bind_error

WHOAMI = "/whoami"
MAX_HEAD = 64 * 1024  # bytes of request line + headers


def xfcc_elements(header: str) -> list[dict[str, str]]:
    """``x-forwarded-client-cert`` split into its elements (``,``) and their ``key=value`` pairs
    (``;``); quoted values may hold ``,`` ``;`` ``=`` and ``\\"`` (Envoy's format,
    envoyproxy/envoy docs "x-forwarded-client-cert"). Keys are kept as sent (``By``,
    ``Hash``, ``URI``, ``Subject``, ``DNS``). Never raises: junk gives odd pairs, not errors."""
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    key, value, in_key, quoted, escaped = "", "", True, False, False
    for char in header + ",":
        if quoted:
            if escaped:
                value, escaped = value + char, False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            else:
                value += char
        elif char == '"' and not in_key:
            quoted = True
        elif char in ";,":
            if key.strip():
                pairs[key.strip()] = value.strip()
            key, value, in_key = "", "", True
            if char == "," and pairs:
                elements.append(pairs)
                pairs = {}
        elif char == "=" and in_key:
            in_key = False
        elif in_key:
            key += char
        else:
            value += char
    return elements


def xfcc_peer(header: str | None) -> str | None:
    """The caller's identity this hop's Envoy recorded: ``URI`` of the last element."""
    elements = xfcc_elements(header or "")
    return elements[-1].get("URI") if elements else None


def answer(app: str, path: str, headers: dict[str, str]) -> tuple[str, bytes]:
    """Content type and body for a request to ``path`` with ``headers`` (lower-case names)."""
    if path.split("?", 1)[0] == WHOAMI:
        xfcc = headers.get("x-forwarded-client-cert")
        body = {"app": app, "peer": xfcc_peer(xfcc), "x-forwarded-client-cert": xfcc}
        return "application/json", (json.dumps(body) + "\n").encode()
    return "text/plain", f"hello from {app}\n".encode()


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Request line + headers -> (path, version, headers with lower-case names).
    ValueError for a malformed request line."""
    lines = head.decode("latin-1").split("\r\n")
    _method, path, version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return path, version, headers


@dataclass
class DemoApp:
    server: asyncio.Server
    connections: Connections

    @property
    def address(self) -> str:
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def close(self) -> None:
        self.server.close()
        await self.connections.close()


async def start_demo_app(app: str, port: int, idle_timeout: float = 30.0) -> DemoApp:
    """Listen on 127.0.0.1:``port`` as ``app`` (``ns/name``). A port in use raises OSError
    with one line naming the port and ``--app-port``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle_timeout)
                path, version, headers = parse_head(head[:MAX_HEAD])
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            except ValueError:
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            keep = keep and "content-length" not in headers and "transfer-encoding" not in headers
            kind, body = answer(app, path, headers)
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            if not keep:
                return

    connections = Connections()
    try:
        server = await asyncio.start_server(connections.track(serve), "127.0.0.1", port)
    except OSError as exc:
        where = f"127.0.0.1:{port}"
        raise OSError(bind_error(where, "demo app", "--app-port PORT (or --no-app)", exc)) from None
    return DemoApp(server, connections)
