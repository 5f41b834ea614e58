"""The DNS core, driven with real DNS messages built and read by dnslib (an independent codec)."""

from __future__ import annotations

import struct

import dnslib
import pytest

from vmagent.dns.answers import parse_upstream_reply
from vmagent.dns.cache import CacheLimits
from vmagent.dns.core import CACHE, STALE, TABLE, UPSTREAM, DnsCore, Forward
from vmagent.dns.table import TableScope, build_lookup, parse_name_table
from vmagent.dns.wire import FLAG_TC

TABLE_DOC = {
    "table": {
        "productpage.ns1.svc.cluster.local": {
            "ips": ["9.9.9.9", "9.9.9.8", "9.9.9.7"],
            "registry": "Kubernetes",
            "shortname": "productpage",
            "namespace": "ns1",
        },
        "v6only.example.com": {"ips": ["2001:db8::1"], "registry": "External"},
        "*.wild.example.com": {"ips": ["1.2.3.4"], "registry": "External"},
        "big.example.com": {
            "ips": [f"10.0.{i // 250}.{i % 250}" for i in range(100)],
            "registry": "External",
        },
    }
}
SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local")


def make_core(ttl: int = 30, limits: CacheLimits | None = None) -> DnsCore:
    core = DnsCore(ttl=ttl, cache_limits=limits)
    table = parse_name_table(TABLE_DOC)
    core.set_lookup(build_lookup(table, TableScope("ns1", search=SEARCH)), 1000.0)
    return core


def query(name: str, qtype: str = "A", edns: int | None = None, qid: int = 4242) -> bytes:
    record = dnslib.DNSRecord.question(name, qtype)
    record.header.id = qid
    if edns is not None:
        record.add_ar(dnslib.EDNS0(udp_len=edns))
    return bytes(record.pack())


def answer(core: DnsCore, packet: bytes, now: float = 0.0, tcp: bool = False) -> dnslib.DNSRecord:
    result = core.handle(packet, now, tcp)
    assert isinstance(result, bytes), result
    return dnslib.DNSRecord.parse(result)


def addresses(reply: dnslib.DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA)]


def test_table_answer_is_authoritative_with_ttl_30_and_class_in() -> None:
    reply = answer(make_core(), query("productpage.ns1.svc.cluster.local"))
    assert reply.header.id == 4242
    assert reply.header.aa == 1 and reply.header.ra == 0 and reply.header.rcode == 0
    assert sorted(addresses(reply)) == ["9.9.9.7", "9.9.9.8", "9.9.9.9"]
    assert {(rr.ttl, rr.rclass) for rr in reply.rr} == {(30, dnslib.CLASS.IN)}


def test_ttl_is_configurable() -> None:
    reply = answer(make_core(ttl=5), query("productpage"))
    assert {rr.ttl for rr in reply.rr} == {5}


def test_question_is_echoed_byte_for_byte_for_0x20_clients() -> None:
    packet = query("PrOdUcTpAgE.nS1.SvC.cLuStEr.LoCaL")
    raw = make_core().handle(packet, 0.0, False)
    assert isinstance(raw, bytes)
    end = len(packet)  # a plain query is header + question only
    assert raw[12:end] == packet[12:end]
    assert len(addresses(dnslib.DNSRecord.parse(raw))) == 3


def test_search_domain_expansion_answers_cname_then_addresses() -> None:
    reply = answer(make_core(), query("productpage.ns1.ns1.svc.cluster.local"))
    assert [rr.rtype for rr in reply.rr] == [dnslib.QTYPE.CNAME] + [dnslib.QTYPE.A] * 3
    assert str(reply.rr[0].rdata) == "productpage.ns1."
    assert {str(rr.rname) for rr in reply.rr[1:]} == {"productpage.ns1."}


def test_names_already_in_the_first_search_domain_get_no_alias_and_are_forwarded() -> None:
    """Reference 3.4 step 5: ``<fqdn>.<search0>`` is not a table name, so the upstream's
    answer (NXDOMAIN, typically) reaches the client."""
    result = make_core().handle(
        query("productpage.ns1.svc.cluster.local.ns1.svc.cluster.local"), 0.0, False
    )
    assert isinstance(result, Forward) and result.cacheable


def test_known_name_without_the_family_is_nodata_not_nxdomain() -> None:
    core = make_core()
    for name in ("productpage", "productpage.ns1.ns1.svc.cluster.local"):
        reply = answer(core, query(name, "AAAA"))
        assert reply.header.rcode == dnslib.RCODE.NOERROR and reply.header.aa == 1
        assert reply.rr == []  # CNAME omitted too, like Istio
    reply = answer(core, query("v6only.example.com", "AAAA"))
    assert addresses(reply) == ["2001:db8::1"]


def test_wildcard_answers_are_owned_by_the_question() -> None:
    reply = answer(make_core(), query("a.b.wild.example.com"))
    assert [(str(rr.rname), str(rr.rdata)) for rr in reply.rr] == [
        ("a.b.wild.example.com.", "1.2.3.4")
    ]


def test_addresses_rotate_round_robin_between_answers() -> None:
    core = make_core()
    packet = query("productpage")
    core.handle(packet, 0.0, False)
    entry = core.fast[packet[2:]]
    firsts = set()
    for _ in range(3):
        reply = dnslib.DNSRecord.parse(packet[:2] + entry.next_reply())
        firsts.add(addresses(reply)[0])
        assert sorted(addresses(reply)) == ["9.9.9.7", "9.9.9.8", "9.9.9.9"]
    assert firsts == {"9.9.9.7", "9.9.9.8", "9.9.9.9"}


def test_other_qtypes_and_unknown_names_are_forwarded() -> None:
    core = make_core()
    mx = core.handle(query("productpage", "MX"), 0.0, False)
    assert isinstance(mx, Forward) and not mx.cacheable  # table names never cached
    other = core.handle(query("www.Example.org"), 0.0, False)
    assert isinstance(other, Forward) and other.cacheable


def test_before_the_first_table_everything_is_forwarded() -> None:
    core = DnsCore()
    assert not core.ready
    assert isinstance(core.handle(query("productpage"), 0.0, False), Forward)


def test_udp_answers_are_truncated_to_512_or_the_edns_size_with_tc() -> None:
    core = make_core()
    raw = core.handle(query("big.example.com"), 0.0, False)
    assert isinstance(raw, bytes) and len(raw) <= 512
    small = dnslib.DNSRecord.parse(raw)
    assert small.header.tc == 1 and 0 < len(small.rr) < 100
    big = answer(core, query("big.example.com", edns=4096))
    assert big.header.tc == 0 and len(addresses(big)) == 100
    assert big.ar[0].rtype == dnslib.QTYPE.OPT  # OPT only because the query had one
    over_tcp = answer(core, query("big.example.com"), tcp=True)
    assert over_tcp.header.tc == 0 and len(addresses(over_tcp)) == 100 and not over_tcp.ar


def upstream_reply(sent: bytes, records: list[dnslib.RR], rcode: int = 0, auth=()) -> bytes:  # type: ignore[no-untyped-def]
    request = dnslib.DNSRecord.parse(sent)
    reply = request.reply()
    reply.header.rcode = rcode
    for rr in records:
        reply.add_answer(rr)
    for rr in auth:
        reply.add_auth(rr)
    reply.add_ar(dnslib.EDNS0(udp_len=1232))
    return bytes(reply.pack())


def forward_and_reply(core: DnsCore, packet: bytes, now: float, build) -> tuple[Forward, bytes]:  # type: ignore[no-untyped-def]
    forward = core.handle(packet, now, False)
    assert isinstance(forward, Forward)
    sent = core.upstream_query(forward, 777)
    reply = parse_upstream_reply(build(sent), sent)
    assert reply is not None
    resolution = core.complete(forward, reply, now)
    return forward, core.render(resolution, forward.query, now, False)


def test_upstream_query_uses_edns_a_fresh_id_and_the_lower_case_name() -> None:
    core = make_core()
    forward = core.handle(query("WWW.Example.ORG", edns=None), 0.0, False)
    assert isinstance(forward, Forward)
    sent = dnslib.DNSRecord.parse(core.upstream_query(forward, 31337))
    assert sent.header.id == 31337 and sent.header.rd == 1
    assert str(sent.q.qname) == "www.example.org."
    assert sent.ar[0].rtype == dnslib.QTYPE.OPT and sent.ar[0].rclass >= 1232


def test_cached_answers_count_down_and_expire() -> None:
    core = make_core()
    packet = query("www.example.org")
    a = dnslib.RR("www.example.org", rdata=dnslib.A("5.6.7.8"), ttl=120)
    _, first = forward_and_reply(core, packet, 100.0, lambda s: upstream_reply(s, [a]))
    assert dnslib.DNSRecord.parse(first).rr[0].ttl == 120
    later = answer(core, query("WWW.example.org", qid=9), now=145.5)
    assert later.header.id == 9 and later.rr[0].ttl == 75
    assert str(later.q.qname) == "WWW.example.org."
    assert isinstance(core.handle(packet, 220.0, False), Forward)  # expired
    assert core.counters.queries[UPSTREAM] == 1 and core.counters.queries[CACHE] == 1


def test_authority_and_additional_records_survive_caching() -> None:
    core = make_core()
    a = dnslib.RR("www.example.org", rdata=dnslib.A("5.6.7.8"), ttl=100)
    ns = dnslib.RR("example.org", dnslib.QTYPE.NS, rdata=dnslib.NS("ns1.example.org"), ttl=100)
    glue = dnslib.RR("ns1.example.org", rdata=dnslib.A("5.6.7.9"), ttl=100)

    def build(sent: bytes) -> bytes:
        reply = dnslib.DNSRecord.parse(upstream_reply(sent, [a], auth=[ns]))
        reply.ar.insert(0, glue)  # glue before the OPT record
        return bytes(reply.pack())

    forward_and_reply(core, query("www.example.org"), 0.0, build)
    cached = answer(core, query("www.example.org"), now=1.0)
    assert [str(rr.rname) for rr in cached.auth] == ["example.org."]
    assert [str(rr.rname) for rr in cached.ar] == ["ns1.example.org."]  # OPT not echoed


def test_positive_ttl_is_capped() -> None:
    core = make_core(limits=CacheLimits(max_ttl=60))
    a = dnslib.RR("www.example.org", rdata=dnslib.A("5.6.7.8"), ttl=86400)
    _, first = forward_and_reply(
        core, query("www.example.org"), 0.0, lambda s: upstream_reply(s, [a])
    )
    assert dnslib.DNSRecord.parse(first).rr[0].ttl == 60  # never promise more than we keep
    assert answer(core, query("www.example.org"), now=10.0).rr[0].ttl == 50
    assert isinstance(core.handle(query("www.example.org"), 59.0, False), bytes)
    assert isinstance(core.handle(query("www.example.org"), 61.0, False), Forward)


def soa(minimum: int, ttl: int) -> dnslib.RR:
    return dnslib.RR(
        "example.org",
        dnslib.QTYPE.SOA,
        rdata=dnslib.SOA("ns.example.org", "admin.example.org", (1, 2, 3, 4, minimum)),
        ttl=ttl,
    )


def test_nxdomain_is_cached_for_the_soa_minimum() -> None:
    core = make_core()
    build = lambda s: upstream_reply(s, [], rcode=3, auth=[soa(minimum=20, ttl=50)])  # noqa: E731
    forward_and_reply(core, query("nope.example.org"), 0.0, build)
    cached = answer(core, query("nope.example.org"), now=5.0)
    # RFC 2308 5: the SOA goes out with min(TTL, MINIMUM), counting down.
    assert cached.header.rcode == dnslib.RCODE.NXDOMAIN and cached.auth[0].ttl == 15
    assert isinstance(core.handle(query("nope.example.org"), 21.0, False), Forward)


def test_negative_answer_without_soa_is_not_cached() -> None:
    core = make_core()
    forward_and_reply(core, query("nope.example.org"), 0.0, lambda s: upstream_reply(s, [], 3))
    assert isinstance(core.handle(query("nope.example.org"), 1.0, False), Forward)


def test_serve_stale_when_every_upstream_fails() -> None:
    core = make_core(limits=CacheLimits(stale_seconds=100))
    a = dnslib.RR("www.example.org", rdata=dnslib.A("5.6.7.8"), ttl=10)
    forward_and_reply(core, query("www.example.org"), 0.0, lambda s: upstream_reply(s, [a]))
    forward = core.handle(query("www.example.org"), 50.0, False)
    assert isinstance(forward, Forward)
    stale = core.complete(forward, None, 50.0)
    reply = dnslib.DNSRecord.parse(core.render(stale, forward.query, 50.0, False))
    assert addresses(reply) == ["5.6.7.8"] and reply.rr[0].ttl == 30
    assert core.counters.queries[STALE] == 1
    too_old = core.complete(forward, None, 200.0)
    failed = dnslib.DNSRecord.parse(core.render(too_old, forward.query, 200.0, False))
    assert failed.header.rcode == dnslib.RCODE.SERVFAIL


def test_upstream_answers_for_table_names_are_not_cached() -> None:
    core = make_core()
    mx = dnslib.RR("productpage", dnslib.QTYPE.MX, rdata=dnslib.MX("mail.example.org"), ttl=300)
    forward_and_reply(core, query("productpage", "MX"), 0.0, lambda s: upstream_reply(s, [mx]))
    assert isinstance(core.handle(query("productpage", "MX"), 1.0, False), Forward)
    assert core.counters.queries[TABLE] == 0


def test_replies_that_do_not_match_the_question_or_id_are_ignored() -> None:
    core = make_core()
    forward = core.handle(query("www.example.org"), 0.0, False)
    assert isinstance(forward, Forward)
    sent = core.upstream_query(forward, 1000)
    good = upstream_reply(sent, [])
    assert parse_upstream_reply(good, sent) is not None
    assert parse_upstream_reply(struct.pack("!H", 1001) + good[2:], sent) is None
    other = dnslib.DNSRecord.question("evil.example.org").reply()
    other.header.id = 1000
    assert parse_upstream_reply(bytes(other.pack()), sent) is None
    assert parse_upstream_reply(good[:-3], sent) is None  # garbage tail


def test_cache_evicts_least_recently_used_entries_by_count() -> None:
    core = make_core(limits=CacheLimits(max_entries=2))
    for i in range(3):
        name = f"n{i}.example.org"
        rr = dnslib.RR(name, rdata=dnslib.A("5.6.7.8"), ttl=100)
        forward_and_reply(core, query(name), 0.0, lambda s, rr=rr: upstream_reply(s, [rr]))
    assert len(core.cache) == 2
    assert isinstance(core.handle(query("n0.example.org"), 1.0, False), Forward)
    assert isinstance(core.handle(query("n2.example.org"), 1.0, False), bytes)


def test_evicted_entries_are_not_served_from_remembered_replies() -> None:
    core = make_core(limits=CacheLimits(max_entries=1))
    packets = {}
    for i in range(2):
        name = f"n{i}.example.org"
        rr = dnslib.RR(name, rdata=dnslib.A("5.6.7.8"), ttl=100)
        packets[i] = query(name)
        forward_and_reply(core, packets[i], 0.0, lambda s, rr=rr: upstream_reply(s, [rr]))
    # n0 was remembered for the fast path, then evicted by n1 within the same second.
    remembered = core.fast.get(packets[0][2:])
    assert remembered is None or remembered.valid_until <= 0.5
    assert isinstance(core.handle(packets[0], 0.5, False), Forward)


def test_cache_is_bounded_in_bytes() -> None:
    core = make_core(limits=CacheLimits(max_bytes=2000))
    for i in range(20):
        name = f"n{i}.example.org"
        rr = dnslib.RR(name, rdata=dnslib.A("5.6.7.8"), ttl=100)
        forward_and_reply(core, query(name), 0.0, lambda s, rr=rr: upstream_reply(s, [rr]))
    assert 0 < len(core.cache) < 20 and core.cache.size_bytes <= 2000


def test_truncated_upstream_reply_is_not_cached() -> None:
    core = make_core()

    def build(sent: bytes) -> bytes:
        raw = bytearray(upstream_reply(sent, []))
        raw[2] |= FLAG_TC >> 8
        return bytes(raw)

    forward_and_reply(core, query("www.example.org"), 0.0, build)
    assert len(core.cache) == 0


@pytest.mark.parametrize(
    ("packet", "rcode"),
    [
        (struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0), dnslib.RCODE.FORMERR),  # no question
        (query("a.example")[:12].replace(b"\x00\x01", b"\x00\x02", 1), dnslib.RCODE.FORMERR),
        (query("a.example")[:-2], dnslib.RCODE.FORMERR),  # truncated question
        (query("a.example") + b"junk", dnslib.RCODE.FORMERR),
        (struct.pack("!HHHHHH", 1, 0x1000, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01", 4),  # opcode 2
    ],
)
def test_malformed_queries_get_formerr_or_notimp(packet: bytes, rcode: int) -> None:
    result = make_core().handle(packet, 0.0, False)
    assert isinstance(result, bytes)
    assert result[:2] == packet[:2] and result[3] & 0xF == rcode and result[2] & 0x80


def test_two_questions_get_formerr() -> None:
    record = dnslib.DNSRecord(q=dnslib.DNSQuestion("a.example"))
    record.add_question(dnslib.DNSQuestion("b.example"))
    result = make_core().handle(bytes(record.pack()), 0.0, False)
    assert isinstance(result, bytes) and result[3] & 0xF == dnslib.RCODE.FORMERR


def test_unsupported_edns_version_gets_badvers() -> None:
    record = dnslib.DNSRecord.question("a.example")
    record.add_ar(dnslib.EDNS0(version=1))
    reply = answer(make_core(), bytes(record.pack()))
    assert reply.ar[0].rtype == dnslib.QTYPE.OPT and (reply.ar[0].ttl >> 24) == 1


RESPONSE = query("a.example")[:2] + b"\x80" + b"\0" * 9


@pytest.mark.parametrize("packet", [b"", b"\x00" * 11, RESPONSE])
def test_headerless_garbage_and_responses_are_dropped(packet: bytes) -> None:
    core = make_core()
    assert core.handle(packet, 0.0, False) is None
    assert core.counters.dropped == 1
