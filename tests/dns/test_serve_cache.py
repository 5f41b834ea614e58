"""Caching of upstream answers: positive, negative (RFC 2308), countdown, caps, LRU,
shared in-flight requests and serve-stale (RFC 8767). Upstream query counts come from the
dnsmasq query log (``Dnsmasq.count``)."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnsfixtures import (
    DelayRelay,
    Dnsmasq,
    DnsServer,
    ServerFactory,
    addresses,
    answer_records,
    frame,
    free_port,
    question_bytes,
    raw_udp,
    start_upstream,
    tcp,
    tcp_read_message,
    udp,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

# Names h100..h199.up.test belong to this module.


@pytest.fixture(scope="module")
def srv(serve_module: ServerFactory) -> DnsServer:
    return serve_module.start()


def ttls(msg: dns.message.Message) -> list[int]:
    """TTLs of the answer section (the authority section of this upstream holds an NS)."""
    return [rrset.ttl for rrset in msg.answer]


def all_ttls(msg: dns.message.Message) -> list[int]:
    return [rrset.ttl for rrset in (*msg.answer, *msg.authority, *msg.additional)]


def test_positive_answer_cached(srv: DnsServer, upstream: Dnsmasq) -> None:
    name = "h100.up.test."
    first = udp(srv, name, "A")
    assert first.rcode() == dns.rcode.NOERROR and len(addresses(first)) == 1
    for msg in (udp(srv, name, "A"), tcp(srv, name, "A"), udp(srv, name.upper(), "A")):
        assert addresses(msg) == addresses(first)
        assert msg.rcode() == dns.rcode.NOERROR
    assert upstream.count(name, "A") == 1, "answers after the first come from the cache"


def test_cached_answer_patched_with_id_and_question(srv: DnsServer) -> None:
    name = "h101.up.test."
    udp(srv, name, "A")
    for spelling in ("H101.Up.TeSt.", "h101.UP.test."):
        q = dns.message.make_query(spelling, "A", use_edns=False)
        wire = q.to_wire()
        reply = raw_udp(srv.host, srv.port, wire)
        assert reply is not None
        assert reply[:2] == wire[:2]
        assert question_bytes(reply) == question_bytes(wire)
        assert len(addresses(dns.message.from_wire(reply))) == 1


def test_ttl_counts_down(srv: DnsServer) -> None:
    name = "h102.up.test."
    first = udp(srv, name, "A")
    (ttl0,) = ttls(first)
    assert 0 < ttl0 <= 60
    time.sleep(2.2)
    (ttl1,) = ttls(udp(srv, name, "A"))
    assert ttl0 - 10 <= ttl1 <= ttl0 - 2, (ttl0, ttl1)


def test_nxdomain_cached_with_soa(srv: DnsServer, upstream: Dnsmasq) -> None:
    name = f"nxc-{uuid.uuid4().hex[:8]}.up.test."
    first = udp(srv, name, "A")
    assert first.rcode() == dns.rcode.NXDOMAIN
    time.sleep(1.1)
    for msg in (udp(srv, name, "A"), tcp(srv, name, "A")):
        assert msg.rcode() == dns.rcode.NXDOMAIN
        assert [r.rdtype for r in msg.authority] == [dns.rdatatype.SOA], "SOA kept (RFC 2308)"
        assert all(t <= 59 for t in all_ttls(msg)), "negative TTL counts down too"
    assert upstream.count(name) == 1


def test_nodata_cached(srv: DnsServer, upstream: Dnsmasq) -> None:
    name = "h103.up.test."
    for msg in (udp(srv, name, "AAAA"), udp(srv, name, "AAAA"), tcp(srv, name, "AAAA")):
        assert msg.rcode() == dns.rcode.NOERROR
        assert msg.answer == []
    assert upstream.count(name, "AAAA") == 1


def test_qtypes_cached_separately(srv: DnsServer, upstream: Dnsmasq) -> None:
    udp(srv, "www.up.test.", "TXT")
    before = upstream.count("www.up.test", "MX")
    msg = udp(srv, "www.up.test.", "MX")
    assert [r[1] for r in answer_records(msg)] == ["MX"]
    assert upstream.count("www.up.test", "MX") in (before, before + 1)
    msg = udp(srv, "www.up.test.", "TXT")
    assert [r[1] for r in answer_records(msg)] == ["TXT"]


def test_cached_answer_follows_each_clients_edns(srv: DnsServer) -> None:
    name = "h104.up.test."
    assert udp(srv, name, "A", edns=True).edns >= 0
    cached = udp(srv, name, "A", edns=False)
    assert cached.edns < 0, "no OPT for a client that sent none"
    assert len(addresses(cached)) == 1
    name = "h105.up.test."
    assert udp(srv, name, "A", edns=False).edns < 0
    cached = udp(srv, name, "A", edns=True)
    assert cached.edns >= 0, "OPT for a client that sent one"
    assert len(addresses(cached)) == 1


def test_ttl_caps(serve: ServerFactory, upstream: Dnsmasq) -> None:
    srv = serve.start(env={"VMAGENT_DNS_CACHE_MAX_TTL": "1", "VMAGENT_DNS_CACHE_NEGATIVE_TTL": "1"})
    pos, neg = "h110.up.test.", f"nxcap-{uuid.uuid4().hex[:8]}.up.test."
    udp(srv, pos, "A")
    udp(srv, neg, "A")
    assert all(t <= 1 for t in ttls(udp(srv, pos, "A"))), "served TTL within the cap"
    time.sleep(2.5)
    assert len(addresses(udp(srv, pos, "A"))) == 1
    assert udp(srv, neg, "A").rcode() == dns.rcode.NXDOMAIN
    assert upstream.count(pos) == 2, "positive entry expired at the cap"
    assert upstream.count(neg) == 2, "negative entry expired at the cap"


def test_cache_is_bounded_lru(serve: ServerFactory, upstream: Dnsmasq) -> None:
    srv = serve.start(env={"VMAGENT_DNS_CACHE_ENTRIES": "2"})
    a, b, c = "h120.up.test.", "h121.up.test.", "h122.up.test."
    for name in (a, b, a, c):  # a is used again before c arrives: b is least recent
        assert len(addresses(udp(srv, name, "A"))) == 1
    assert len(addresses(udp(srv, a, "A"))) == 1  # still cached
    assert len(addresses(udp(srv, b, "A"))) == 1  # evicted: asked again
    assert upstream.count(a) == 1
    assert upstream.count(b) == 2
    assert upstream.count(c) == 1


def test_identical_concurrent_queries_share_one_upstream_request(
    serve: ServerFactory, upstream: Dnsmasq
) -> None:
    relay = DelayRelay((upstream.host, upstream.port), 0.6)
    socks: list[socket.socket] = []
    try:
        srv = serve.start(upstreams=[relay.address])
        name = "h130.up.test."
        queries = [dns.message.make_query(name, "A", use_edns=False) for _ in range(20)]
        for q in queries:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(5)
            socks.append(sock)
            sock.sendto(q.to_wire(), (srv.host, srv.port))
        for q, sock in zip(queries, socks):
            reply = dns.message.from_wire(sock.recv(65535))
            assert reply.id == q.id
            assert len(addresses(reply)) == 1
        assert len(relay.queries_for(name)) == 1, "one upstream request for 20 clients"
        assert upstream.count(name) == 1
    finally:
        for sock in socks:
            sock.close()
        relay.close()


def test_coalesced_clients_each_get_their_own_reply(
    serve: ServerFactory, upstream: Dnsmasq
) -> None:
    """Clients sharing one upstream request differ in ID, 0x20 case, EDNS and transport."""
    relay = DelayRelay((upstream.host, upstream.port), 0.6)
    socks: list[socket.socket] = []
    try:
        srv = serve.start(upstreams=[relay.address])
        spellings = ["h131.up.test.", "H131.UP.TEST.", "h131.Up.TeSt.", "H131.up.test."]
        sent: list[tuple[bytes, socket.socket, bool]] = []
        for i in range(12):
            edns = i % 2 == 0
            q = dns.message.make_query(spellings[i % 4], "A", use_edns=0 if edns else False)
            wire = q.to_wire()
            if i % 3 == 2:
                sock = socket.create_connection((srv.host, srv.port), timeout=5)
                sock.sendall(frame(wire))
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.settimeout(5)
                sock.sendto(wire, (srv.host, srv.port))
            socks.append(sock)
            sent.append((wire, sock, edns))
        for wire, sock, edns in sent:
            stream = sock.type == socket.SOCK_STREAM
            reply = tcp_read_message(sock) if stream else sock.recv(65535)
            assert reply is not None
            assert reply[:2] == wire[:2], "own ID"
            assert question_bytes(reply) == question_bytes(wire), "own 0x20 spelling"
            msg = dns.message.from_wire(reply)
            assert (msg.edns >= 0) == edns, "OPT only for the clients that sent one"
            assert len(addresses(msg)) == 1
        assert len(relay.queries_for("h131.up.test.")) == 1
    finally:
        for sock in socks:
            sock.close()
        relay.close()


def test_first_forwarded_answer_echoes_0x20_question(srv: DnsServer) -> None:
    q = dns.message.make_query("H161.uP.TeSt.", "A", use_edns=False)
    wire = q.to_wire()
    reply = raw_udp(srv.host, srv.port, wire)
    assert reply is not None
    assert question_bytes(reply) == question_bytes(wire)
    assert len(addresses(dns.message.from_wire(reply))) == 1


def test_servfail_not_cached_for_long(serve: ServerFactory, tmp_path: Path) -> None:
    port = free_port()
    srv = serve.start(upstreams=[f"127.0.0.1:{port}"], env=STALE_ENV)
    assert udp(srv, "h170.up.test.", "A", timeout=10).rcode() == dns.rcode.SERVFAIL
    revived = start_upstream(tmp_path / "revived", port=port)
    try:
        assert wait_until(
            lambda: udp(srv, "h170.up.test.", "A").rcode() == dns.rcode.NOERROR, 10, 0.5
        ), "still failing 10 s after the upstream came back"
    finally:
        revived.stop()


STALE_ENV = {"VMAGENT_DNS_ATTEMPT_TIMEOUT": "300ms", "DNS_FORWARD_TIMEOUT": "1s"}


def test_serve_stale_when_upstream_dies(serve: ServerFactory, tmp_path: Path) -> None:
    short = start_upstream(tmp_path / "short", ttl=1)
    try:
        srv = serve.start(upstreams=[short.address], env=STALE_ENV)
        fresh = udp(srv, "h140.up.test.", "A")
        fresh_nx = udp(srv, "nxstale.up.test.", "A")
        assert fresh.rcode() == dns.rcode.NOERROR and fresh_nx.rcode() == dns.rcode.NXDOMAIN
        time.sleep(2.2)  # both expired (TTL 1)
        short.kill()
        for msg in (udp(srv, "h140.up.test.", "A", timeout=10), tcp(srv, "h140.up.test.", "A")):
            assert msg.rcode() == dns.rcode.NOERROR
            assert addresses(msg) == addresses(fresh)
            assert ttls(msg) == [30], "stale answers carry TTL 30 (RFC 8767)"
        # a name never seen before cannot be served stale
        never = udp(srv, "h141.up.test.", "A", timeout=10)
        assert never.rcode() == dns.rcode.SERVFAIL
    finally:
        short.stop()


def test_no_stale_beyond_window(serve: ServerFactory, tmp_path: Path) -> None:
    short = start_upstream(tmp_path / "short", ttl=1)
    try:
        srv = serve.start(
            upstreams=[short.address], env={**STALE_ENV, "VMAGENT_DNS_STALE_SECONDS": "1"}
        )
        assert udp(srv, "h150.up.test.", "A").rcode() == dns.rcode.NOERROR
        time.sleep(3.5)  # expired at ~1 s, stale window closed at ~2 s
        short.kill()
        assert udp(srv, "h150.up.test.", "A", timeout=10).rcode() == dns.rcode.SERVFAIL
    finally:
        short.stop()


def test_flags_of_cached_answer(srv: DnsServer) -> None:
    name = "h160.up.test."
    udp(srv, name, "A")
    q = dns.message.make_query(name, "A", use_edns=False, flags=0)  # RD clear this time
    second = dns.message.from_wire(raw_udp(srv.host, srv.port, q.to_wire()) or b"")
    assert second.id == q.id
    assert second.flags & dns.flags.QR
    assert not second.flags & dns.flags.RD, "RD copied from this query, not the cached one"
    assert len(addresses(second)) == 1
