"""A tiny loopback DNS server (UDP and TCP) whose answers a test scripts with dnspython.

For upstream behaviour dnsmasq cannot be made to show: a validating resolver that answers
SERVFAIL unless CD=1, DNSSEC records only with DO=1, CNAME-only NODATA answers with chosen
TTLs. Every query it receives is recorded (name, type, CD, DO, transport). Bounded: at most
``limit`` queries are answered, each TCP connection serves at most 100 queries, every wait has
a timeout, and :meth:`close` ends both threads.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from dnsfixtures import LOOPBACK, frame, free_port, hostport, tcp_read_message

# query in, reply out (None: stay silent)
Handler = Callable[[dns.message.Message], "dns.message.Message | None"]


@dataclass(frozen=True)
class Asked:
    """One query as the upstream saw it."""

    name: str
    rdtype: str
    cd: bool
    do: bool
    tcp: bool


class ScriptedUpstream:
    def __init__(self, handler: Handler, *, delay: float = 0.0, limit: int = 500) -> None:
        self.handler = handler
        self.delay = delay
        self.limit = limit
        self.host = LOOPBACK
        self.port = free_port()
        self.asked: list[Asked] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((self.host, self.port))
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind((self.host, self.port))
        self._tcp.listen(16)
        self._threads = [
            threading.Thread(target=self._udp_loop, daemon=True),
            threading.Thread(target=self._tcp_loop, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    def count(self, name: str, **match: bool) -> int:
        """Queries for ``name`` seen so far, optionally only those with e.g. ``cd=True``."""
        want = name.lower().rstrip(".") + "."
        with self._lock:
            return sum(
                1
                for a in self.asked
                if a.name == want and all(getattr(a, k) == v for k, v in match.items())
            )

    def _answer(self, wire: bytes, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        question = query.question[0]
        with self._lock:
            if len(self.asked) >= self.limit:
                return None
            self.asked.append(
                Asked(
                    question.name.to_text().lower(),
                    dns.rdatatype.to_text(question.rdtype),
                    bool(query.flags & dns.flags.CD),
                    bool(query.ednsflags & dns.flags.DO),
                    tcp,
                )
            )
        if self.delay and self._stop.wait(self.delay):
            return None
        reply = self.handler(query)
        return None if reply is None else reply.to_wire()

    def _udp_loop(self) -> None:
        self._udp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._reply_udp, args=(wire, peer), daemon=True).start()

    def _reply_udp(self, wire: bytes, peer: tuple[str, int]) -> None:
        answer = self._answer(wire, tcp=False)
        if answer is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(answer, peer)

    def _tcp_loop(self) -> None:
        self._tcp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True).start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        with conn:
            for _ in range(100):
                wire = tcp_read_message(conn, timeout=3)
                if wire is None:
                    return
                answer = self._answer(wire, tcp=True)
                if answer is None:
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(frame(answer))

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self._udp.close()
        self._tcp.close()


def reply(
    query: dns.message.Message,
    answer: Sequence[str] = (),
    authority: Sequence[str] = (),
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
) -> dns.message.Message:
    """A reply to ``query`` (RA set, as a recursive upstream's) with records given as zone-file
    lines, e.g. ``"www.example. 300 IN CNAME edge.example."``."""
    message = dns.message.make_response(query)
    message.flags |= dns.flags.RA
    message.set_rcode(rcode)
    for section, lines in ((message.answer, answer), (message.authority, authority)):
        for line in lines:
            name, ttl, rdclass, rdtype, *rdata = line.split()
            section.append(dns.rrset.from_text(name, int(ttl), rdclass, rdtype, " ".join(rdata)))
    return message
