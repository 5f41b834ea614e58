"""vmagent's own error replies (SERVFAIL, FORMERR, NOTIMP, BADVERS) carry RA, as a
recursive resolver's replies do, and echo RD and CD: dig must not warn "recursion requested but
not available" about them.

Forwarded and cached replies keep the upstream's header bits, and table answers are AA with RA
clear: both exactly as Istio's agent (reference 3.4: upstream replies relayed verbatim,
``SetReply`` + AA for mesh names).
"""

from __future__ import annotations

import socket
import struct

import dns.flags
import dns.message
import dns.rcode
import pytest
from dnsfixtures import (
    LOOPBACK,
    Dnsmasq,
    DnsServer,
    ServerFactory,
    dig,
    dig_flags,
    frame,
    free_port,
    raw_udp,
    tcp_read_message,
)

pytestmark = pytest.mark.timeout(60)

WARNING = "recursion requested but not available"
FAST_FAIL = {"VMAGENT_DNS_ATTEMPT_TIMEOUT": "300ms", "DNS_FORWARD_TIMEOUT": "1s"}
QUESTION = b"\x03www\x02up\x04test\x00\x00\x01\x00\x01"
RD, CD, RA = 0x0100, 0x0010, 0x0080


@pytest.fixture(scope="module")
def dead_upstream_srv(serve_module: ServerFactory) -> DnsServer:
    """A server whose only upstream is a closed port: everything forwarded fails."""
    return serve_module.start(upstreams=[f"{LOOPBACK}:{free_port()}"], env=FAST_FAIL)


def exchange(srv: DnsServer, packet: bytes, transport: str) -> bytes:
    if transport == "udp":
        reply = raw_udp(srv.host, srv.port, packet)
    else:
        with socket.create_connection((srv.host, srv.port), timeout=5) as sock:
            sock.sendall(frame(packet))
            reply = tcp_read_message(sock)
    assert reply is not None, f"no reply over {transport}"
    return reply


def test_dig_sees_ra_on_servfail(dead_upstream_srv: DnsServer, dig_tool: None) -> None:
    for args in ((), ("+tcp",), ("+cd",), ("+noedns",)):
        out = dig(dead_upstream_srv, "www.up.test.", "A", *args)
        assert "status: SERVFAIL" in out, out
        flags = dig_flags(out)
        assert "ra" in flags and "rd" in flags, out
        assert ("cd" in flags) == ("+cd" in args)
        assert WARNING not in out, out


def test_dig_sees_ra_on_badvers(dead_upstream_srv: DnsServer, dig_tool: None) -> None:
    for args in (("+edns=1", "+noednsnegotiation"), ("+edns=1", "+noednsnegotiation", "+tcp")):
        out = dig(dead_upstream_srv, "productpage.ns1.svc.cluster.local.", "A", *args)
        assert "status: BADVERS" in out, out
        assert "ra" in dig_flags(out) and WARNING not in out, out


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize(
    ("flags", "qdcount", "rcode"),
    [
        (RD | CD, 0, dns.rcode.FORMERR),  # no question
        (RD | CD, 2, dns.rcode.FORMERR),  # two questions
        (RD | CD | 0x1000, 1, dns.rcode.NOTIMP),  # opcode 2 (STATUS)
        (RD | CD | 0x2800, 1, dns.rcode.NOTIMP),  # opcode 5 (UPDATE)
        (CD, 0, dns.rcode.FORMERR),  # RD clear stays clear
    ],
    ids=["formerr-no-question", "formerr-two-questions", "notimp-status", "notimp-update", "no-rd"],
)
def test_formerr_and_notimp_carry_ra(
    dead_upstream_srv: DnsServer, transport: str, flags: int, qdcount: int, rcode: int
) -> None:
    packet = struct.pack("!HHHHHH", 0x4242, flags, qdcount, 0, 0, 0) + QUESTION * qdcount
    reply = exchange(dead_upstream_srv, packet, transport)
    got = struct.unpack_from("!H", reply, 2)[0]
    assert got & 0xF == rcode
    assert got & RA, "RA clear on vmagent's own error reply"
    assert got & (RD | CD) == flags & (RD | CD), "RD and CD echoed"
    assert got & 0x7800 == flags & 0x7800, "opcode echoed"


def test_forwarded_replies_and_table_answers_keep_their_flags(
    serve: ServerFactory, upstream: Dnsmasq, dig_tool: None
) -> None:
    """Forwarded replies keep the upstream's header bits (Istio relays them verbatim; the
    standard upstream is authoritative for up.test, so AA and no RA), table answers are AA
    with RA clear (Istio's SetReply)."""
    srv = serve.start()
    forwarded = dig(srv, "www.up.test.", "A")
    direct = dig(upstream, "www.up.test.", "A")
    assert "status: NOERROR" in forwarded
    assert dig_flags(forwarded) == dig_flags(direct)
    q = dns.message.make_query("productpage.ns1.svc.cluster.local.", "A")
    table = dns.message.from_wire(raw_udp(srv.host, srv.port, q.to_wire()) or b"")
    assert table.flags & dns.flags.AA and not table.flags & dns.flags.RA
