"""The pure core's cache and reply rules: what a cached answer may be served to (CD and DO
bits), how long negative answers behind a CNAME are kept, address rotation on both transports,
and the header of vmagent's own error replies. Messages are built and read with dnslib."""

from __future__ import annotations

import struct
from collections.abc import Callable

import dnslib
import pytest

from vmagent.dns.answers import parse_upstream_reply
from vmagent.dns.cache import CacheLimits
from vmagent.dns.core import CACHE, ERROR, TABLE, DnsCore, Forward
from vmagent.dns.table import TableScope, build_lookup, parse_name_table

ROTATING = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
TABLE_DOC = {"table": {"multi.example.com": {"ips": ROTATING, "registry": "External"}}}

Build = Callable[[bytes], bytes]


def make_core(limits: CacheLimits | None = None) -> DnsCore:
    core = DnsCore(cache_limits=limits)
    lookup = build_lookup(parse_name_table(TABLE_DOC), TableScope("ns1", search=("ns1.svc",)))
    core.set_lookup(lookup, 0.0)
    return core


def query(
    name: str, qtype: str = "A", *, cd: bool = False, do: bool = False, qid: int = 7
) -> bytes:
    record = dnslib.DNSRecord.question(name, qtype)
    record.header.id = qid
    record.header.cd = int(cd)
    if do:
        record.add_ar(dnslib.EDNS0(udp_len=1232, flags="do"))
    return bytes(record.pack())


def reply_to(sent: bytes, answer: list[dnslib.RR], rcode: int = 0, auth=()) -> bytes:  # type: ignore[no-untyped-def]
    reply = dnslib.DNSRecord.parse(sent).reply()
    reply.header.rcode = rcode
    for rr in answer:
        reply.add_answer(rr)
    for rr in auth:
        reply.add_auth(rr)
    reply.add_ar(dnslib.EDNS0(udp_len=1232))
    return bytes(reply.pack())


def ask(core: DnsCore, packet: bytes, now: float, build: Build | None) -> dnslib.DNSRecord:
    """One client query through the core: from the table or cache, else via ``build`` as the
    upstream (None: every upstream failed)."""
    result = core.handle(packet, now, False)
    if isinstance(result, bytes):
        return dnslib.DNSRecord.parse(result)
    assert isinstance(result, Forward), result
    reply = None
    if build is not None:
        sent = core.upstream_query(result, 99)
        reply = parse_upstream_reply(build(sent), sent)
        assert reply is not None
    resolution = core.complete(result, reply, now)
    return dnslib.DNSRecord.parse(core.render(resolution, result.query, now, False))


def a_record(name: str, ip: str = "5.6.7.8", ttl: int = 300) -> dnslib.RR:
    return dnslib.RR(name, rdata=dnslib.A(ip), ttl=ttl)


# --- CD and DO are part of what a cached answer is for ----------------------------------------


def cd_sensitive_upstream(asked: list[tuple[bool, bool]]) -> Build:
    """A validating upstream for a bogus zone: SERVFAIL unless CD=1 (then the data)."""

    def build(sent: bytes) -> bytes:
        request = dnslib.DNSRecord.parse(sent)
        do = any(rr.rtype == dnslib.QTYPE.OPT and rr.ttl & 0x8000 for rr in request.ar)
        asked.append((bool(request.header.cd), bool(do)))
        if not request.header.cd:
            return reply_to(sent, [], rcode=dnslib.RCODE.SERVFAIL)
        return reply_to(sent, [a_record("bogus.example.org")])

    return build


def test_answer_fetched_with_cd_is_never_served_to_a_cd0_client() -> None:
    """RFC 4035 3.2.2, coredns/coredns#6186: +nocd, +cd, +nocd -> SERVFAIL, data, SERVFAIL,
    and the third query goes upstream again (with CD clear)."""
    core = make_core()
    asked: list[tuple[bool, bool]] = []
    build = cd_sensitive_upstream(asked)
    first = ask(core, query("bogus.example.org"), 0.0, build)
    second = ask(core, query("bogus.example.org", cd=True), 1.0, build)
    third = ask(core, query("bogus.example.org"), 2.0, build)
    assert first.header.rcode == dnslib.RCODE.SERVFAIL
    assert second.header.rcode == 0 and second.header.cd == 1 and len(second.rr) == 1
    assert third.header.rcode == dnslib.RCODE.SERVFAIL and third.rr == []
    assert asked == [(False, False), (True, False), (False, False)]
    # And the other way round: the CD=1 answer is cached for CD=1 clients only.
    again = ask(core, query("bogus.example.org", cd=True), 3.0, None)
    assert len(again.rr) == 1 and core.counters.queries[CACHE] == 1


def test_cd0_and_cd1_never_share_an_upstream_request_or_a_stale_answer() -> None:
    core = make_core(CacheLimits(stale_seconds=3600))
    plain = core.handle(query("bogus.example.org"), 0.0, False)
    checking_disabled = core.handle(query("bogus.example.org", cd=True), 0.0, False)
    assert isinstance(plain, Forward) and isinstance(checking_disabled, Forward)
    assert plain.key != checking_disabled.key  # the shell coalesces requests by key
    assert core.upstream_query(plain, 1)[2:4] != core.upstream_query(checking_disabled, 1)[2:4]
    ask(core, query("bogus.example.org", cd=True), 0.0, cd_sensitive_upstream([]))
    # Every upstream failing later: the CD=1 answer is not served stale to a CD=0 client.
    failed = ask(core, query("bogus.example.org"), 400.0, None)
    assert failed.header.rcode == dnslib.RCODE.SERVFAIL


def test_answer_fetched_with_do_is_kept_apart_from_one_without() -> None:
    """The DO bit selects answers with or without DNSSEC records: same rule as CD."""
    core = make_core()
    asked: list[tuple[bool, bool]] = []

    def build(sent: bytes) -> bytes:
        request = dnslib.DNSRecord.parse(sent)
        do = any(rr.rtype == dnslib.QTYPE.OPT and rr.ttl & 0x8000 for rr in request.ar)
        asked.append((bool(request.header.cd), bool(do)))
        records = [a_record("signed.example.org")]
        if do:
            records.append(
                dnslib.RR(
                    "signed.example.org",
                    dnslib.QTYPE.TXT,
                    ttl=300,
                    rdata=dnslib.TXT("stand-in for an RRSIG"),
                )
            )
        return reply_to(sent, records)

    with_do = ask(core, query("signed.example.org", do=True), 0.0, build)
    without = ask(core, query("signed.example.org"), 1.0, build)
    with_do_again = ask(core, query("signed.example.org", do=True), 2.0, build)
    assert len(with_do.rr) == 2 and len(without.rr) == 1 and len(with_do_again.rr) == 2
    assert asked == [(False, True), (False, False)]  # the third came from the cache


# --- NODATA behind a CNAME is negative (RFC 2308 2.2) ----------------------------------------


def soa(minimum: int, ttl: int) -> dnslib.RR:
    return dnslib.RR(
        "example.net",
        dnslib.QTYPE.SOA,
        rdata=dnslib.SOA("ns.example.net", "admin.example.net", (1, 2, 3, 4, minimum)),
        ttl=ttl,
    )


def cname(owner: str, target: str, ttl: int = 300) -> dnslib.RR:
    return dnslib.RR(owner, dnslib.QTYPE.CNAME, rdata=dnslib.CNAME(target), ttl=ttl)


def cached_for(core: DnsCore, packet: bytes, start: float, limit: int = 400) -> int:
    """Whole seconds after ``start`` during which ``packet`` is answered from the cache."""
    for second in range(1, limit):
        if isinstance(core.handle(packet, start + second, False), Forward):
            return second - 1
    return limit


def test_nodata_behind_a_cname_is_cached_for_the_soa_negative_ttl() -> None:
    """c-ares/c-ares#1293: AAAA -> CNAME (300 s) + SOA (TTL 5, MINIMUM 5): kept 5 s, not 300."""
    core = make_core()
    chain = [cname("www.example.net", "edge.example.net")]
    build = lambda s: reply_to(s, chain, auth=[soa(minimum=5, ttl=5)])  # noqa: E731
    first = ask(core, query("www.example.net", "AAAA"), 100.0, build)
    assert [rr.rtype for rr in first.rr] == [dnslib.QTYPE.CNAME]
    assert first.rr[0].ttl <= 5, "never promise the CNAME longer than it is kept"
    assert cached_for(core, query("www.example.net", "AAAA"), 100.0) == 4


def test_nxdomain_behind_a_cname_is_kept_no_longer_than_the_cname() -> None:
    core = make_core()
    chain = [cname("old.example.net", "gone.example.net", ttl=10)]
    build = lambda s: reply_to(s, chain, rcode=3, auth=[soa(minimum=50, ttl=50)])  # noqa: E731
    ask(core, query("old.example.net"), 0.0, build)
    assert cached_for(core, query("old.example.net"), 0.0) == 9


@pytest.mark.parametrize(("negative_ttl", "kept"), [(60, 59), (7, 6)])
def test_cname_chain_without_the_type_or_an_soa_is_nodata_with_the_default_negative_ttl(
    negative_ttl: int, kept: int
) -> None:
    core = make_core(CacheLimits(max_negative_ttl=negative_ttl))
    chain = [cname("a.example.net", "b.example.net"), cname("b.example.net", "c.example.net")]
    ask(core, query("a.example.net", "AAAA"), 0.0, lambda s: reply_to(s, chain))
    assert cached_for(core, query("a.example.net", "AAAA"), 0.0) == kept


def test_a_cname_is_a_positive_answer_to_a_cname_query() -> None:
    core = make_core(CacheLimits(max_negative_ttl=5))
    chain = [cname("a.example.net", "b.example.net")]
    ask(core, query("a.example.net", "CNAME"), 0.0, lambda s: reply_to(s, chain))
    assert cached_for(core, query("a.example.net", "CNAME"), 0.0) == 299


def test_cname_then_the_asked_type_stays_positive() -> None:
    core = make_core(CacheLimits(max_negative_ttl=5))
    chain = [cname("a.example.net", "b.example.net"), a_record("b.example.net", ttl=100)]
    ask(core, query("a.example.net"), 0.0, lambda s: reply_to(s, chain))
    assert cached_for(core, query("a.example.net"), 0.0) == 99


# --- round robin on both transports ----------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True])
def test_table_addresses_rotate_over_udp_and_tcp(tcp: bool) -> None:
    core = make_core()
    packet = query("multi.example.com")
    firsts = []
    for _ in range(len(ROTATING)):
        if not tcp and packet[2:] in core.fast:  # what the UDP shell does for a repeat
            raw = packet[:2] + core.fast[packet[2:]].next_reply()
        else:
            result = core.handle(packet, 0.0, tcp)
            assert isinstance(result, bytes)
            raw = result
        reply = dnslib.DNSRecord.parse(raw)
        assert reply.header.id == 7 and sorted(str(rr.rdata) for rr in reply.rr) == ROTATING
        firsts.append(str(reply.rr[0].rdata))
    assert sorted(firsts) == ROTATING, f"addresses do not rotate: {firsts}"
    assert core.counters.queries[TABLE] == len(ROTATING) - (0 if tcp else len(ROTATING) - 1)


@pytest.mark.parametrize("tcp", [False, True])
def test_addresses_rotate_for_queries_that_differ_in_more_than_the_id(tcp: bool) -> None:
    """dig sends a fresh random cookie each time: no two queries are alike, still rotate."""
    core = make_core()
    firsts = []
    for i in range(len(ROTATING)):
        record = dnslib.DNSRecord.question("multi.example.com", "A")
        record.add_ar(dnslib.EDNS0(udp_len=1232, opts=[dnslib.EDNSOption(10, bytes([i]) * 8)]))
        result = core.handle(bytes(record.pack()), 0.0, tcp)
        assert isinstance(result, bytes)
        firsts.append(str(dnslib.DNSRecord.parse(result).rr[0].rdata))
    assert sorted(firsts) == ROTATING, f"addresses do not rotate: {firsts}"


def test_tcp_remembered_replies_follow_the_cache_entry() -> None:
    core = make_core()
    build = lambda s: reply_to(s, [a_record("t.example.org", ttl=20)])  # noqa: E731
    result = core.handle(query("t.example.org"), 0.0, True)
    assert isinstance(result, Forward)
    sent = core.upstream_query(result, 5)
    resolution = core.complete(result, parse_upstream_reply(build(sent), sent), 0.0)
    core.render(resolution, result.query, 0.0, True)
    later = core.handle(query("t.example.org", qid=8), 5.5, True)
    assert isinstance(later, bytes) and later[:2] == b"\x00\x08"
    assert dnslib.DNSRecord.parse(later).rr[0].ttl == 15  # counts down, from the cache
    assert isinstance(core.handle(query("t.example.org"), 21.0, True), Forward)


# --- vmagent's own error replies -------------------------------------------------------------


def flags_of(reply: bytes) -> int:
    return int(struct.unpack_from("!H", reply, 2)[0])


def test_every_error_reply_sets_ra_and_echoes_rd_and_cd() -> None:
    core = make_core()
    question = query("x.example.org")[12:]
    formerr = struct.pack("!HHHHHH", 1, 0x0110, 0, 0, 0, 0)  # no question, RD+CD
    notimp = struct.pack("!HHHHHH", 2, 0x1110, 1, 0, 0, 0) + question  # opcode 2
    badvers = dnslib.DNSRecord.question("x.example.org")
    badvers.header.cd = 1
    badvers.add_ar(dnslib.EDNS0(version=1))
    replies = [core.handle(p, 0.0, False) for p in (formerr, notimp, bytes(badvers.pack()))]
    forward = core.handle(query("x.example.org", cd=True), 0.0, False)
    assert isinstance(forward, Forward)
    failed = core.complete(forward, None, 0.0)  # every upstream failed: SERVFAIL
    replies.append(core.render(failed, forward.query, 0.0, False))
    assert core.counters.queries[ERROR] == 4
    for reply, rcode in zip(replies, (1, 4, 0, 2)):
        assert isinstance(reply, bytes)
        flags = flags_of(reply)
        assert flags & 0x0080, f"RA clear in rcode {rcode} reply"
        assert flags & 0x0100 and flags & 0x0010, "RD and CD echoed"
        assert flags & 0xF == rcode
