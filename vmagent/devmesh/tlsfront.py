"""TLS in front of a loopback plaintext gRPC server, with an optional client certificate.

grpcio's server credentials can require a client certificate or not ask for one, but not
"ask, verify if given" (what istiod does: the bootstrap token on the first call, the workload
cert on renewals). So the dev CA terminates TLS here (``CERT_OPTIONAL``, verified against the
dev root, ALPN h2), relays bytes to its gRPC server on 127.0.0.1, and remembers which verified
peer certificate each relayed connection carries, keyed by the relay's local port, which the
gRPC server sees as ``context.peer()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from vmagent.devmesh.connections import Connections

log = logging.getLogger(__name__)

CHUNK = 65536


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()


class TlsFront:
    def __init__(self, context: ssl.SSLContext, backend_port: int) -> None:
        self.context = context
        self.backend_port = backend_port
        self._peers: dict[int, bytes | None] = {}
        self._server: asyncio.AbstractServer | None = None
        self._connections = Connections()

    @staticmethod
    def make_context(cert_file: str, key_file: str, client_root_pem: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(cadata=client_root_pem)
        context.verify_mode = ssl.CERT_OPTIONAL
        context.set_alpn_protocols(["h2"])
        return context

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._connections.track(self._handle), host, port, ssl=self.context
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._connections.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def peer_certificate(self, grpc_peer: str) -> bytes | None:
        """DER of the verified client certificate behind a gRPC peer string, if any."""
        try:
            port = int(grpc_peer.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            return None
        return self._peers.get(port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        try:
            back_reader, back_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError as exc:
            log.warning("dev CA backend unreachable: %s", exc)
            writer.close()
            return
        local_port = int(back_writer.get_extra_info("sockname")[1])
        self._peers[local_port] = peer
        pumps = [
            asyncio.ensure_future(_pump(reader, back_writer)),
            asyncio.ensure_future(_pump(back_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._peers.pop(local_port, None)
            for w in (writer, back_writer):
                with contextlib.suppress(Exception):
                    w.close()
