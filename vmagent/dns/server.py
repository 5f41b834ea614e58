"""The DNS proxy's socket shell: UDP and TCP listeners around :class:`DnsCore`.

UDP is read straight off non-blocking sockets with ``loop.add_reader`` in batches, answering
repeated queries from ``core.fast`` with one dict lookup (the asyncio datagram transport reads
one packet per loop iteration, far too slow for the target). Everything that must go upstream
is grouped by question so identical concurrent queries share one upstream request."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vmagent.dns.answers import UpstreamReply
from vmagent.dns.core import ERROR, DnsCore, Forward
from vmagent.dns.resolvconf import Address
from vmagent.dns.wire import RCODE_SERVFAIL, Query, error_reply

log = logging.getLogger("vmagent.dns")

UDP_BATCH = 256
MAX_TCP_QUERY = 4096
MAX_PENDING_KEYS = 4096
MAX_WAITERS_PER_KEY = 256
TCP_WRITE_BUFFER_LIMIT = 256 * 1024

Resolver = Callable[[bytes], Awaitable["UpstreamReply | None"]]
Sender = Callable[[bytes], None]


@dataclass(frozen=True)
class TcpLimits:
    idle_timeout: float = 10.0
    max_connections: int = 256


class DnsServer:
    def __init__(self, core: DnsCore, resolver: Resolver, tcp_limits: TcpLimits) -> None:
        self.core = core
        self._resolver = resolver
        self._tcp_limits = tcp_limits
        self._waiters: dict[bytes, list[tuple[Query, Sender, bool]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._udp_sockets: list[socket.socket] = []
        self._tcp_servers: list[asyncio.base_events.Server] = []
        self._tcp_connections = 0

    async def listen(self, address: Address) -> None:
        """Serve UDP and TCP on one address (port 0 picks a free port, same for both)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            udp.bind(address)
            udp.setblocking(False)
            port = udp.getsockname()[1]
            server = await asyncio.start_server(
                self._serve_tcp, address[0], port, family=family, reuse_address=True
            )
        except OSError:
            udp.close()
            raise
        loop.add_reader(udp.fileno(), self._udp_readable, udp)
        self._udp_sockets.append(udp)
        self._tcp_servers.append(server)
        log.info("dns: listening on %s port %d (udp+tcp)", address[0], port)

    @property
    def addresses(self) -> list[Address]:
        return [s.getsockname()[:2] for s in self._udp_sockets]

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for udp in self._udp_sockets:
            loop.remove_reader(udp.fileno())
            udp.close()
        for server in self._tcp_servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._udp_sockets.clear()
        self._tcp_servers.clear()

    # --- UDP ---

    def _udp_readable(self, sock: socket.socket) -> None:
        core = self.core
        fast = core.fast
        counts = core.counters.queries
        now = time.monotonic()
        recvfrom, sendto = sock.recvfrom, sock.sendto
        for _ in range(UDP_BATCH):
            try:
                data, addr = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. an ICMP error queued on the socket
            entry = fast.get(data[2:])
            if entry is not None and entry.valid_until > now:
                counts[entry.outcome] += 1
                entry.hits += 1
                try:
                    sendto(data[:2] + entry.next_reply(), addr)
                except OSError:
                    pass  # full socket buffer: the client retries, as with any lost datagram
                continue
            result = core.handle(data, now, False)
            fast = core.fast
            if result is None:
                continue
            if isinstance(result, bytes):
                try:
                    sendto(result, addr)
                except OSError:
                    pass
            else:
                self._forward(result, _udp_sender(sock, addr), tcp=False)

    # --- TCP ---

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self._tcp_limits
        if self._tcp_connections >= limits.max_connections:
            writer.close()
            return
        self._tcp_connections += 1
        try:
            while True:
                try:
                    prefix = await asyncio.wait_for(reader.readexactly(2), limits.idle_timeout)
                    length = struct.unpack("!H", prefix)[0]
                    if length < 12 or length > MAX_TCP_QUERY:
                        break
                    packet = await asyncio.wait_for(reader.readexactly(length), limits.idle_timeout)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
                result = self.core.handle(packet, time.monotonic(), True)
                if result is None:
                    continue
                send = _tcp_sender(writer)
                if isinstance(result, bytes):
                    send(result)
                else:
                    self._forward(result, send, tcp=True)
        finally:
            self._tcp_connections -= 1
            writer.close()

    # --- forwarding ---

    def _forward(self, forward: Forward, send: Sender, tcp: bool) -> None:
        waiting = self._waiters.get(forward.key)
        if waiting is not None:
            if len(waiting) < MAX_WAITERS_PER_KEY:
                waiting.append((forward.query, send, tcp))
            return
        if len(self._waiters) >= MAX_PENDING_KEYS:
            # Overload: fail fast instead of queueing without bound.
            self.core.counters.queries[ERROR] += 1
            q = forward.query
            send(error_reply(q.packet, RCODE_SERVFAIL, q.question_end, q.edns, q.do))
            return
        self._waiters[forward.key] = [(forward.query, send, tcp)]
        task = asyncio.ensure_future(self._resolve(forward))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, forward: Forward) -> None:
        sent = self.core.upstream_query(forward, secrets.randbits(16))
        started = time.monotonic()
        reply: UpstreamReply | None = None
        try:
            reply = await self._resolver(sent)
        except Exception:  # a bug must not strand the waiting clients
            log.exception("dns: upstream exchange failed")
        finally:
            now = time.monotonic()
            self.core.counters.observe_upstream(now - started)
            waiters = self._waiters.pop(forward.key, [])
        resolution = self.core.complete(forward, reply, now)
        for query, send, tcp in waiters:
            send(self.core.render(resolution, query, now, tcp))


def _udp_sender(sock: socket.socket, addr: Address) -> Sender:
    def send(reply: bytes) -> None:
        try:
            sock.sendto(reply, addr)
        except OSError:
            pass

    return send


def _tcp_sender(writer: asyncio.StreamWriter) -> Sender:
    def send(reply: bytes) -> None:
        transport = writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > TCP_WRITE_BUFFER_LIMIT:
            transport.abort()  # a client that does not read its answers loses the connection
            return
        writer.write(struct.pack("!H", len(reply)) + reply)

    return send
