"""Socket-level fuzzing of ``vmagent dns serve`` with hypothesis.

Hypothesis draws a seed, a valid base query and a mutation recipe; each example expands into
a few hundred packets (flipped, inserted, deleted, truncated bytes, header fields rewritten,
pure noise) fired over UDP without waiting for replies, plus a TCP connection carrying framed
mutants and occasionally a bad length prefix. Over 100k packets in total, bounded in count and
time. Every few examples, and at the end, the server must still answer a valid query correctly
over UDP and TCP, and its process must be alive with no traceback in its output.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import pytest
from dnsfixtures import (
    Dnsmasq,
    DnsServer,
    ServerFactory,
    addresses,
    frame,
    start_upstream,
    tcp,
    udp,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 600
UDP_PER_EXAMPLE = 380
UDP_BATCH = 95  # packets in flight at once: fits the server's default socket buffer
TCP_PER_EXAMPLE = 24
MIN_PACKETS = 100_000
TIME_BUDGET = 50.0  # seconds of sending; the whole test stays around a minute
CHECK_EVERY = 40  # examples between liveness checks

NAMES = [
    "productpage.ns1.svc.cluster.local.",
    "productpage.",
    "reviews.ns2.ns1.svc.cluster.local.",
    "x.wild.example.com.",
    "www.up.test.",
    "big.up.test.",
    "nx.up.test.",
    ".",
]
QTYPES = ["A", "AAAA", "TXT", "MX", "SRV", "PTR", "ANY", "CNAME", "SOA", "NS", "TYPE65"]
OPS = ["flip", "flip", "set", "insert", "delete", "truncate", "header", "counts", "noise", "dup"]


@pytest.fixture(scope="module")
def quiet_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    """The standard upstream without a query log (a log of 100k lines only costs time)."""
    server = start_upstream(tmp_path_factory.mktemp("quiet"), log=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fuzz_srv(serve_module: ServerFactory, quiet_upstream: Dnsmasq) -> DnsServer:
    return serve_module.start(upstreams=[quiet_upstream.address])


def base_query(name: str, qtype: str, edns: bool, qid: int) -> bytes:
    msg = dns.message.make_query(name, qtype, use_edns=0 if edns else False, id=qid)
    return msg.to_wire()


def mutate(wire: bytes, ops: list[str], rng: random.Random) -> bytes:
    data = bytearray(wire)
    for op in ops:
        if op == "flip" and data:
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        elif op == "set" and data:
            special = (0, 0x3F, 0x40, 0xC0, 0xFF, rng.randrange(256))
            data[rng.randrange(len(data))] = rng.choice(special)
        elif op == "insert":
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
        elif op == "delete" and data:
            pos = rng.randrange(len(data))
            del data[pos : pos + rng.randrange(1, 6)]
        elif op == "truncate":
            del data[rng.randrange(len(data) + 1) :]
        elif op == "header" and len(data) >= 4:
            flags = rng.choice((rng.randrange(65536), 0x8000, 0x7800, 0x2800, 0x0200, 0x0040))
            data[2:4] = struct.pack("!H", flags)
        elif op == "counts" and len(data) >= 12:
            field = rng.randrange(4)
            value = rng.choice((0, 1, 2, 255, 65535, rng.randrange(65536)))
            data[4 + 2 * field : 6 + 2 * field] = struct.pack("!H", value)
        elif op == "noise":
            data = bytearray(rng.randbytes(rng.randrange(0, 600)))
        elif op == "dup" and len(data) > 12:
            data += data[12:]
    return bytes(data[:65000])


SYNC_NAME = "productpage.ns1.svc.cluster.local."


def sync(sync_sock: socket.socket, target: tuple[str, int], qid: int) -> bool:
    """Send a valid query on its own socket and wait for its answer (bounded: 5 s).

    UDP is read in order: the answer comes only once the packets queued before it were read.
    """
    sync_sock.sendto(base_query(SYNC_NAME, "A", False, qid), target)
    deadline = time.monotonic() + 5
    while (remaining := deadline - time.monotonic()) > 0:
        sync_sock.settimeout(remaining)
        try:
            reply = sync_sock.recv(65535)
        except (TimeoutError, BlockingIOError):
            return False
        with contextlib.suppress(Exception):
            msg = dns.message.from_wire(reply)
            if msg.id == qid and addresses(msg) == ["9.9.9.9"]:
                return True
    return False


def drain_udp(sock: socket.socket) -> int:
    """Read and count every reply waiting on the fuzz socket (non-blocking, bounded)."""
    count = 0
    sock.setblocking(False)
    for _ in range(100_000):
        try:
            sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            break
        count += 1
    return count


def drain(conn: socket.socket, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        while (remaining := deadline - time.monotonic()) > 0:
            conn.settimeout(remaining)
            if not conn.recv(65535):
                return


def check_alive(server: DnsServer) -> None:
    """The server answers a valid table query (a few tries: a flooded UDP queue may drop one)."""
    assert server.alive(), f"server died:\n{server.output()[-4000:]}"
    last: Exception | None = None
    for _ in range(5):
        try:
            assert addresses(udp(server, "productpage.ns1.svc.cluster.local.", timeout=2)) == [
                "9.9.9.9"
            ]
            break
        except Exception as exc:  # timeout while the backlog drains
            last = exc
    else:
        raise AssertionError(f"no valid UDP answer after fuzzing: {last!r}")
    assert addresses(tcp(server, "productpage.ns1.svc.cluster.local.", timeout=5)) == ["9.9.9.9"]


@pytest.mark.timeout(150)
def test_fuzz_packets_udp_and_tcp(fuzz_srv: DnsServer, tmp_path: Path) -> None:
    target = (fuzz_srv.host, fuzz_srv.port)
    stats = {"udp": 0, "tcp": 0, "examples": 0, "conns": 0, "replies": 0, "lost_syncs": 0}
    started = time.monotonic()
    udp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    udp_sock.setblocking(False)
    sync_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(
        seed=st.integers(0, 2**32 - 1),
        name=st.sampled_from(NAMES),
        qtype=st.sampled_from(QTYPES),
        edns=st.booleans(),
        recipe=st.lists(st.sampled_from(OPS), min_size=1, max_size=5),
        bad_prefix=st.sampled_from([None, None, None, 0, 3, 11, 4097, 65535]),
    )
    def fire(
        seed: int, name: str, qtype: str, edns: bool, recipe: list[str], bad_prefix: int | None
    ) -> None:
        if time.monotonic() - started > TIME_BUDGET:
            return
        rng = random.Random(seed)
        stats["examples"] += 1
        base = base_query(name, qtype, edns, rng.randrange(65536))
        for batch in range(UDP_PER_EXAMPLE // UDP_BATCH):
            for _ in range(UDP_BATCH):
                ops = rng.sample(recipe, k=rng.randrange(1, len(recipe) + 1))
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    udp_sock.sendto(mutate(base, ops, rng), target)
                    stats["udp"] += 1
            # Wait until the server got through the batch, then read what it answered.
            if not sync(sync_sock, target, (stats["examples"] * 16 + batch) % 65536):
                stats["lost_syncs"] += 1
            stats["replies"] += drain_udp(udp_sock)
        stream = b"".join(frame(mutate(base, recipe, rng)[:4000]) for _ in range(TCP_PER_EXAMPLE))
        if bad_prefix is not None:
            stream += struct.pack("!H", bad_prefix) + rng.randbytes(min(bad_prefix, 32))
        with contextlib.suppress(OSError), socket.create_connection(target, timeout=1) as conn:
            stats["conns"] += 1
            conn.sendall(stream)
            stats["tcp"] += TCP_PER_EXAMPLE
            conn.shutdown(socket.SHUT_WR)
            drain(conn, 0.3)
        if stats["examples"] % CHECK_EVERY == 0:
            check_alive(fuzz_srv)

    try:
        fire()
    finally:
        udp_sock.close()
        sync_sock.close()
    total = stats["udp"] + stats["tcp"]
    print(f"fuzz: {stats} total={total} in {time.monotonic() - started:.1f}s")
    check_alive(fuzz_srv)
    assert total >= MIN_PACKETS, f"only {total} packets sent within the time budget: {stats}"
    # A lost sync means the server stalled (or dropped a valid query) for 5 s; allow a couple.
    assert stats["lost_syncs"] <= 2, stats
    assert "Traceback" not in fuzz_srv.output(), fuzz_srv.output()[-4000:]
