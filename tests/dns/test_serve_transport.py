"""Transport: UDP truncation, EDNS (RFC 6891), TCP pipelining/idle/cap/oversize, bad packets."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnsfixtures import (
    BIG_COUNT,
    HUGE_COUNT,
    MANY_V4,
    MEDIUM_COUNT,
    DnsServer,
    ServerFactory,
    addresses,
    connection_closed,
    dig,
    dig_flags,
    frame,
    header_counts,
    raw_udp,
    rcode_of,
    tcp,
    tcp_read_message,
    udp,
)

pytestmark = pytest.mark.timeout(60)

TABLE_NAME = "productpage.ns1.svc.cluster.local."


@pytest.fixture(scope="module")
def srv(serve_module: ServerFactory) -> DnsServer:
    return serve_module.start()


@contextlib.contextmanager
def tcp_conn(server: DnsServer, timeout: float = 5.0) -> Iterator[socket.socket]:
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def assert_still_answers(server: DnsServer) -> None:
    assert server.alive(), server.output()
    assert addresses(udp(server, TABLE_NAME)) == ["9.9.9.9"]
    assert addresses(tcp(server, TABLE_NAME)) == ["9.9.9.9"]


def assert_whole_records(wire: bytes) -> dns.message.Message:
    """Parse a (possibly truncated) reply strictly: every counted record must be complete."""
    msg = dns.message.from_wire(wire, raise_on_truncation=False)
    _, an, ns, ar = header_counts(wire)
    assert an == sum(len(r) for r in msg.answer), "ANCOUNT matches whole answer records"
    assert ns == sum(len(r) for r in msg.authority)
    assert ar == sum(len(r) for r in msg.additional) + (1 if msg.edns >= 0 else 0)
    return msg


# --- UDP sizes and EDNS -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count"), [("medium.up.test.", MEDIUM_COUNT), ("big.up.test.", BIG_COUNT)]
)
def test_udp_without_edns_truncated_to_512(srv: DnsServer, name: str, count: int) -> None:
    tcp(srv, name)  # whatever the order, the cached answer must be truncated too
    for _ in range(2):
        q = dns.message.make_query(name, "A", use_edns=False)
        wire = raw_udp(srv.host, srv.port, q.to_wire())
        assert wire is not None
        assert len(wire) <= 512
        msg = assert_whole_records(wire)
        assert msg.flags & dns.flags.TC
        assert msg.rcode() == dns.rcode.NOERROR
        assert msg.edns < 0, "no OPT in the reply when the query had none"
        assert 0 < len(addresses(msg)) < count


def test_udp_edns_1232_truncated(srv: DnsServer) -> None:
    q = dns.message.make_query("big.up.test.", "A", use_edns=0, payload=1232)
    wire = raw_udp(srv.host, srv.port, q.to_wire())
    assert wire is not None
    assert 512 < len(wire) <= 1232
    msg = assert_whole_records(wire)
    assert msg.flags & dns.flags.TC
    assert msg.edns == 0
    assert 0 < len(addresses(msg)) < BIG_COUNT


def test_small_edns_payload_means_512(srv: DnsServer) -> None:
    q = dns.message.make_query("medium.up.test.", "A", use_edns=0, payload=100)
    wire = raw_udp(srv.host, srv.port, q.to_wire())
    assert wire is not None and len(wire) <= 512
    msg = assert_whole_records(wire)
    assert msg.flags & dns.flags.TC


def test_udp_edns_4096_full_answer(srv: DnsServer) -> None:
    msg = udp(srv, "big.up.test.", "A", edns=0, payload=4096)
    assert not msg.flags & dns.flags.TC
    assert len(addresses(msg)) == BIG_COUNT
    assert msg.edns == 0


def test_table_answer_truncated_over_udp(srv: DnsServer) -> None:
    name = "many.external.com."
    for edns, limit in ((False, 512), (0, 1232)):
        q = dns.message.make_query(name, "A", use_edns=edns, payload=1232)
        wire = raw_udp(srv.host, srv.port, q.to_wire())
        assert wire is not None and len(wire) <= limit
        msg = assert_whole_records(wire)
        assert msg.flags & dns.flags.TC and msg.flags & dns.flags.AA
        assert msg.rcode() == dns.rcode.NOERROR
        got = addresses(msg)
        assert got and set(got) < set(MANY_V4)
    full = udp(srv, name, "A", edns=0, payload=4096)
    assert not full.flags & dns.flags.TC
    assert sorted(addresses(full)) == sorted(MANY_V4)
    assert sorted(addresses(tcp(srv, name, "A"))) == sorted(MANY_V4)


@pytest.mark.parametrize("edns", [False, True])
def test_tcp_full_answers(srv: DnsServer, edns: bool) -> None:
    for name, count in (("big.up.test.", BIG_COUNT), ("huge.up.test.", HUGE_COUNT)):
        msg = tcp(srv, name, "A", edns=edns)
        assert msg.rcode() == dns.rcode.NOERROR
        assert not msg.flags & dns.flags.TC
        assert len(addresses(msg)) == count, name
        assert (msg.edns >= 0) == edns


def test_huge_answer_over_udp_4096_is_truncated_not_servfail(srv: DnsServer) -> None:
    q = dns.message.make_query("huge.up.test.", "A", use_edns=0, payload=4096)
    wire = raw_udp(srv.host, srv.port, q.to_wire())
    assert wire is not None and len(wire) <= 4096
    msg = assert_whole_records(wire)
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.TC


@pytest.mark.parametrize("name", [TABLE_NAME, "www.up.test."])
def test_edns_reply_has_opt_only_when_query_had_one(srv: DnsServer, name: str) -> None:
    for transport in (udp, tcp):
        assert transport(srv, name, "A", edns=False).edns < 0
        with_opt = transport(srv, name, "A", edns=0, payload=1232)
        assert with_opt.edns == 0
        assert with_opt.rcode() == dns.rcode.NOERROR


def test_edns_unknown_version_is_badvers(srv: DnsServer) -> None:
    q = dns.message.make_query(TABLE_NAME, "A", use_edns=1, payload=1232)
    wire = raw_udp(srv.host, srv.port, q.to_wire())
    assert wire is not None
    msg = dns.message.from_wire(wire)
    assert msg.rcode() == dns.rcode.BADVERS, "RFC 6891 6.1.3"
    assert msg.edns == 0
    assert msg.answer == []


def test_two_opt_records_is_formerr(srv: DnsServer) -> None:
    q = dns.message.make_query(TABLE_NAME, "A", use_edns=False)
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    wire = q.to_wire()
    wire = wire[:10] + struct.pack("!H", 2) + wire[12:] + opt + opt
    reply = raw_udp(srv.host, srv.port, wire)
    assert reply is not None
    assert reply[:2] == wire[:2]
    assert rcode_of(reply) == dns.rcode.FORMERR, "RFC 6891 6.1.1"


def test_edns_options_and_do_bit_tolerated(srv: DnsServer) -> None:
    cookie = dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * 8)
    q = dns.message.make_query(
        TABLE_NAME, "A", use_edns=0, payload=1232, want_dnssec=True, options=[cookie]
    )
    msg = dns.message.from_wire(raw_udp(srv.host, srv.port, q.to_wire()) or b"")
    assert addresses(msg) == ["9.9.9.9"]
    assert msg.edns == 0


def test_dig_truncation_and_tcp_fallback(srv: DnsServer, dig_tool: None) -> None:
    out = dig(srv, "+noedns", "+ignore", "big.up.test")
    assert {"qr", "tc"} <= dig_flags(out)
    out = dig(srv, "+noedns", "big.up.test")  # dig retries over TCP on TC
    assert f"ANSWER: {BIG_COUNT}," in out
    out = dig(srv, "+bufsize=4096", "big.up.test")
    assert f"ANSWER: {BIG_COUNT}," in out


# --- TCP ----------------------------------------------------------------------------------


def test_tcp_pipelining(srv: DnsServer) -> None:
    names = [TABLE_NAME, "www.up.test.", "x.wild.example.com.", "big.up.test.", "reviews.ns2."]
    queries = [dns.message.make_query(n, "A", use_edns=False) for n in names]
    with tcp_conn(srv) as sock:
        sock.sendall(b"".join(frame(q.to_wire()) for q in queries))  # one write, 5 queries
        replies = {}
        for _ in queries:
            wire = tcp_read_message(sock)
            assert wire is not None, "connection closed or stalled before all answers"
            msg = dns.message.from_wire(wire)
            replies[msg.id] = msg
        # and the connection still serves a sixth query
        q6 = dns.message.make_query(TABLE_NAME, "AAAA", use_edns=False)
        sock.sendall(frame(q6.to_wire()))
        sixth = tcp_read_message(sock)
    assert set(replies) == {q.id for q in queries}
    for q in queries:
        assert replies[q.id].question == q.question
        assert addresses(replies[q.id])
    assert sixth is not None and dns.message.from_wire(sixth).id == q6.id


def test_tcp_query_split_across_segments(srv: DnsServer) -> None:
    q = dns.message.make_query(TABLE_NAME, "A", use_edns=False)
    data = frame(q.to_wire())
    with tcp_conn(srv) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
            time.sleep(0.002)
        wire = tcp_read_message(sock)
    assert wire is not None
    assert addresses(dns.message.from_wire(wire)) == ["9.9.9.9"]


@pytest.mark.parametrize("prefix", [0, 5, 11, 4097, 0xFFFF])
def test_tcp_bad_length_prefix_closes_connection(srv: DnsServer, prefix: int) -> None:
    with tcp_conn(srv) as sock:
        sock.sendall(struct.pack("!H", prefix) + b"\x00" * min(prefix, 64))
        assert connection_closed(sock, 5), f"prefix {prefix}: connection left open"
    assert_still_answers(srv)


def test_tcp_stalled_client_does_not_block_others(srv: DnsServer) -> None:
    with tcp_conn(srv) as stalled, tcp_conn(srv) as half:
        stalled.sendall(b"\x00")  # half a length prefix, then nothing
        half.sendall(struct.pack("!H", 40) + b"\x12\x34")  # a prefix and part of a message
        for _ in range(3):
            assert_still_answers(srv)


def test_tcp_idle_timeout(serve: ServerFactory) -> None:
    srv = serve.start(env={"VMAGENT_DNS_TCP_IDLE_TIMEOUT": "1s"})
    with tcp_conn(srv) as sock:
        q = dns.message.make_query(TABLE_NAME, "A", use_edns=False)
        sock.sendall(frame(q.to_wire()))
        assert tcp_read_message(sock) is not None
        assert connection_closed(sock, 6), "idle connection not closed"
    with tcp_conn(srv) as silent:
        assert connection_closed(silent, 6), "connection that never sent anything not closed"


def test_tcp_default_idle_timeout_keeps_connection_for_a_while(srv: DnsServer) -> None:
    with tcp_conn(srv) as sock:
        assert not connection_closed(sock, 1.5), "closed well before the 10 s default"
        q = dns.message.make_query(TABLE_NAME, "A", use_edns=False)
        sock.sendall(frame(q.to_wire()))
        assert tcp_read_message(sock) is not None


def test_tcp_connection_cap(serve: ServerFactory) -> None:
    srv = serve.start(env={"VMAGENT_DNS_TCP_MAX_CONNECTIONS": "4"})
    q = dns.message.make_query(TABLE_NAME, "A", use_edns=False)
    held: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = socket.create_connection((srv.host, srv.port), timeout=5)
            held.append(sock)
            sock.sendall(frame(q.to_wire()))
            assert tcp_read_message(sock) is not None
        extra = socket.create_connection((srv.host, srv.port), timeout=5)
        held.append(extra)
        try:
            extra.sendall(frame(q.to_wire()))
            answered = tcp_read_message(extra, timeout=2) is not None
        except OSError:
            answered = False
        if answered:
            # The fifth connection may be served only if one of the first four was let go.
            closed = [connection_closed(s, 0.5) for s in held[:4]]
            assert any(closed), "five TCP connections served at once with a cap of 4"
        # UDP is unaffected by the TCP cap
        assert addresses(udp(srv, TABLE_NAME)) == ["9.9.9.9"]
    finally:
        for sock in held:
            sock.close()
    # once the held connections are gone, new ones are served again
    time.sleep(0.3)
    assert addresses(tcp(srv, TABLE_NAME)) == ["9.9.9.9"]


# --- bad packets --------------------------------------------------------------------------


def header(
    qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


QUESTION = b"\x0bproductpage\x03ns1\x03svc\x07cluster\x05local\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(
    ("packet", "rcode"),
    [
        (header() + b"\x3fabc", dns.rcode.FORMERR),  # label runs past the end
        (header() + b"\x03abc", dns.rcode.FORMERR),  # name without terminator
        (header() + b"\x03abc\x00\x00", dns.rcode.FORMERR),  # question cut in qtype
        (header() + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),  # pointer loop
        (header(qd=0), dns.rcode.FORMERR),  # no question
        (header(qd=2) + QUESTION + QUESTION, dns.rcode.FORMERR),  # two questions
        (header(qd=1, an=3) + QUESTION, dns.rcode.FORMERR),  # counts beyond the data
        (header(flags=0x1100) + QUESTION, dns.rcode.NOTIMP),  # opcode 2 (STATUS)
        (header(flags=0x2100) + QUESTION, dns.rcode.NOTIMP),  # opcode 4 (NOTIFY)
        (header(flags=0x2900) + QUESTION, dns.rcode.NOTIMP),  # opcode 5 (UPDATE)
        (header(flags=0x7900) + QUESTION, dns.rcode.NOTIMP),  # opcode 15
    ],
)
def test_bad_packets_get_error_reply(srv: DnsServer, packet: bytes, rcode: int) -> None:
    for transport in ("udp", "tcp"):
        if transport == "udp":
            reply = raw_udp(srv.host, srv.port, packet)
        else:
            with tcp_conn(srv) as sock:
                sock.sendall(frame(packet))
                reply = tcp_read_message(sock)
        assert reply is not None, f"no reply over {transport}"
        assert reply[:2] == packet[:2], "ID copied"
        assert reply[2] & 0x80, "QR set"
        assert (reply[2] >> 3) & 0x0F == (packet[2] >> 3) & 0x0F, "opcode copied"
        assert rcode_of(reply) == rcode, transport
    assert_still_answers(srv)


@pytest.mark.parametrize("packet", [b"", b"\x00", b"\x12\x34\x01", b"\xff" * 11])
def test_headerless_garbage_dropped(srv: DnsServer, packet: bytes) -> None:
    assert raw_udp(srv.host, srv.port, packet, timeout=0.5) is None
    assert_still_answers(srv)


def test_responses_are_not_answered(srv: DnsServer) -> None:
    # A packet with QR=1 is somebody's answer: replying would allow reflection loops.
    packet = header(flags=0x8180) + QUESTION
    assert raw_udp(srv.host, srv.port, packet, timeout=0.5) is None
    assert_still_answers(srv)


def test_garbage_burst_then_valid(srv: DnsServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(2000):
            sock.sendto(bytes([i % 256]) * (i % 40), (srv.host, srv.port))
    assert_still_answers(srv)
