"""The cache keys on the CD and DO bits (RFC 4035 3.2.2; coredns/coredns#6186).

The upstream is a scripted validating resolver for a broken zone: SERVFAIL without CD, the
data with CD=1; DNSSEC records only when DO=1. A CD=1 answer must never reach a CD=0 client
(from the cache, from the remembered-reply fast path, or by sharing one in-flight request).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from dnsfixtures import DnsServer, ServerFactory, dig, dig_flags
from scripted_upstream import ScriptedUpstream, reply

pytestmark = pytest.mark.timeout(60)

BOGUS = "bogus.sec.test."
SIGNED = "signed.sec.test."
RRSIG = (
    "signed.sec.test. 300 IN RRSIG A 13 3 300 20300101000000 20200101000000 12345 sec.test. "
    "dGhpcyBpcyBub3QgYSByZWFsIHNpZ25hdHVyZSBidXQgaXQgcGFyc2Vz"
)


def validating_resolver(query: dns.message.Message) -> dns.message.Message:
    name = query.question[0].name.to_text().lower()
    if name.startswith("bogus") or name.startswith("inflight"):
        if not query.flags & dns.flags.CD:
            return reply(query, rcode=dns.rcode.SERVFAIL)  # validation failed
        return reply(query, [f"{name} 300 IN A 192.0.2.1"])
    if name == SIGNED:
        records = [f"{SIGNED} 300 IN A 192.0.2.2"]
        if query.ednsflags & dns.flags.DO:
            records.append(RRSIG)
        return reply(query, records)
    return reply(query, rcode=dns.rcode.NXDOMAIN)


@pytest.fixture
def upstream_and_server(serve: ServerFactory) -> Iterator[tuple[ScriptedUpstream, DnsServer]]:
    scripted = ScriptedUpstream(validating_resolver)
    try:
        yield scripted, serve.start(upstreams=[scripted.address])
    finally:
        scripted.close()


def status(out: str) -> str:
    return out.split("status: ", 1)[1].split(",", 1)[0] if "status: " in out else out


def test_dig_nocd_cd_nocd(upstream_and_server: tuple[ScriptedUpstream, DnsServer]) -> None:
    """The issue's repro: the third query is SERVFAIL again and was asked upstream again."""
    scripted, srv = upstream_and_server
    first = dig(srv, BOGUS, "A", "+nocd")
    second = dig(srv, BOGUS, "A", "+cd")
    third = dig(srv, BOGUS, "A", "+nocd")
    assert status(first) == "SERVFAIL"
    assert status(second) == "NOERROR" and "192.0.2.1" in second
    assert "cd" in dig_flags(second)
    assert status(third) == "SERVFAIL", "a CD=1 answer was served to a CD=0 client"
    assert "192.0.2.1" not in third
    assert scripted.count(BOGUS, cd=False) == 2
    assert scripted.count(BOGUS, cd=True) == 1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_fast_path_never_crosses_cd(
    upstream_and_server: tuple[ScriptedUpstream, DnsServer], transport: str
) -> None:
    """Byte-identical queries except CD (same ID even): repeats of the CD=1 query come from the
    remembered replies; the CD=0 one still goes upstream and fails."""
    scripted, srv = upstream_and_server
    name = f"bogus-{transport}.sec.test."
    send = dns.query.udp if transport == "udp" else dns.query.tcp
    for cd in (True, True, True, False, True, False):
        q = dns.message.make_query(name, "A", use_edns=0, flags=dns.flags.RD)
        q.id = 4321
        if cd:
            q.flags |= dns.flags.CD
        got = send(q, srv.host, timeout=5, port=srv.port)
        if cd:
            assert got.rcode() == dns.rcode.NOERROR and got.flags & dns.flags.CD
        else:
            assert got.rcode() == dns.rcode.SERVFAIL and got.answer == []
    assert scripted.count(name, cd=True) == 1  # cached and remembered
    assert scripted.count(name, cd=False) == 2  # SERVFAIL: asked every time


def test_cd0_and_cd1_do_not_share_one_upstream_request(serve: ServerFactory) -> None:
    """Concurrent CD=0 and CD=1 queries while the upstream is slow: two upstream requests,
    each client gets its own answer."""
    scripted = ScriptedUpstream(validating_resolver, delay=0.5)
    try:
        srv = serve.start(upstreams=[scripted.address])
        name = "inflight.sec.test."
        results: dict[bool, dns.message.Message] = {}

        def ask(cd: bool) -> None:
            q = dns.message.make_query(name, "A", use_edns=0)
            if cd:
                q.flags |= dns.flags.CD
            results[cd] = dns.query.udp(q, srv.host, timeout=5, port=srv.port)

        threads = [threading.Thread(target=ask, args=(cd,)) for cd in (False, True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert results[False].rcode() == dns.rcode.SERVFAIL
        assert results[True].rcode() == dns.rcode.NOERROR and results[True].answer
        assert scripted.count(name, cd=False) == 1 and scripted.count(name, cd=True) == 1
    finally:
        scripted.close()


def test_do_bit_answers_kept_apart(
    upstream_and_server: tuple[ScriptedUpstream, DnsServer],
) -> None:
    """Same kind: DNSSEC records fetched for DO=1 never reach a DO=0 client and vice versa."""
    scripted, srv = upstream_and_server

    def ask(do: bool) -> list[str]:
        q = dns.message.make_query(SIGNED, "A", want_dnssec=do, use_edns=0)
        got = dns.query.udp(q, srv.host, timeout=5, port=srv.port)
        assert got.rcode() == dns.rcode.NOERROR
        return sorted(dns.rdatatype.to_text(rrset.rdtype) for rrset in got.answer)

    for _ in range(2):
        assert ask(True) == ["A", "RRSIG"]
        assert ask(False) == ["A"]
    assert scripted.count(SIGNED, do=True) == 1 and scripted.count(SIGNED, do=False) == 1
