"""Asking upstream servers: UDP with a TCP retry on truncation, sequential or parallel."""

from __future__ import annotations

import asyncio
import logging
import struct

from vmagent.dns.answers import UpstreamReply, parse_upstream_reply
from vmagent.dns.resolvconf import Address
from vmagent.dns.wire import RCODE_NOERROR, RCODE_NXDOMAIN

log = logging.getLogger("vmagent.dns")
GOOD_RCODES = (RCODE_NOERROR, RCODE_NXDOMAIN)


class _ReplyProtocol(asyncio.DatagramProtocol):
    def __init__(self, sent: bytes, done: asyncio.Future[UpstreamReply]) -> None:
        self.sent, self.done = sent, done

    def datagram_received(self, data: bytes, addr: object) -> None:
        reply = parse_upstream_reply(data, self.sent)
        if reply is not None and not self.done.done():
            self.done.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def exchange_udp(server: Address, sent: bytes, timeout: float) -> UpstreamReply:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[UpstreamReply] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _ReplyProtocol(sent, done), remote_addr=server
    )
    try:
        transport.sendto(sent)
        return await asyncio.wait_for(done, timeout)
    finally:
        transport.close()


async def exchange_tcp(server: Address, sent: bytes, timeout: float) -> UpstreamReply:
    async def talk() -> UpstreamReply:
        reader, writer = await asyncio.open_connection(server[0], server[1])
        try:
            writer.write(struct.pack("!H", len(sent)) + sent)
            while True:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                reply = parse_upstream_reply(await reader.readexactly(length), sent)
                if reply is not None:
                    return reply
        finally:
            writer.close()

    return await asyncio.wait_for(talk(), timeout)


async def ask_server(server: Address, sent: bytes, timeout: float) -> UpstreamReply | None:
    """One server's good reply (NOERROR/NXDOMAIN), or None after logging why not."""
    try:
        reply = await exchange_udp(server, sent, timeout)
        if reply.truncated:
            reply = await exchange_tcp(server, sent, timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        log.debug("upstream %s:%d failed: %r", server[0], server[1], exc)
        return None
    if reply.rcode not in GOOD_RCODES:
        log.debug("upstream %s:%d answered rcode %d", server[0], server[1], reply.rcode)
        return None
    return reply


async def resolve(
    servers: tuple[Address, ...],
    sent: bytes,
    parallel: bool,
    attempt_timeout: float,
    total_timeout: float,
) -> UpstreamReply | None:
    """The first good reply from ``servers`` within ``total_timeout``, or None."""
    if not servers:
        return None
    try:
        if not parallel:
            return await asyncio.wait_for(
                _sequential(servers, sent, attempt_timeout), total_timeout
            )
        return await asyncio.wait_for(_parallel(servers, sent, attempt_timeout), total_timeout)
    except asyncio.TimeoutError:
        return None


async def _sequential(
    servers: tuple[Address, ...], sent: bytes, timeout: float
) -> UpstreamReply | None:
    for server in servers:
        reply = await ask_server(server, sent, timeout)
        if reply is not None:
            return reply
    return None


async def _parallel(
    servers: tuple[Address, ...], sent: bytes, timeout: float
) -> UpstreamReply | None:
    pending = {asyncio.ensure_future(ask_server(s, sent, timeout)) for s in servers}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                reply = task.result()
                if reply is not None:
                    return reply
        return None
    finally:
        for task in pending:
            task.cancel()
