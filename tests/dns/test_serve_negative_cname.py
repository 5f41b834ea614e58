"""NODATA behind a CNAME is a negative answer (RFC 2308 2.2; c-ares/c-ares#1293).

A scripted upstream answers AAAA for an IPv4-only name behind a CNAME: the CNAME (TTL 300)
plus the target zone's SOA (TTL 5, MINIMUM 5). vmagent must keep that for the SOA's 5 s, not
for the CNAME's 300 s, so the name recovers when the AAAA record appears. A chain without an
SOA is cached as NODATA for the configured negative TTL (``VMAGENT_DNS_CACHE_NEGATIVE_TTL``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import dns.message
import dns.rcode
import pytest
from dnsfixtures import DnsServer, ServerFactory, answer_records, tcp, udp
from scripted_upstream import ScriptedUpstream, reply

pytestmark = pytest.mark.timeout(60)

SOA = "neg.test. 5 IN SOA ns.neg.test. admin.neg.test. 1 3600 600 86400 5"


def upstream_answers(query: dns.message.Message) -> dns.message.Message:
    name = query.question[0].name.to_text().lower()
    if name.startswith("alias"):  # alias -> edge, edge has an A record only
        return reply(query, [f"{name} 300 IN CNAME edge.neg.test."], [SOA])
    if name.startswith("chain"):  # a chain of two CNAMEs, no AAAA, no SOA
        return reply(
            query,
            [f"{name} 300 IN CNAME mid.neg.test.", "mid.neg.test. 300 IN CNAME end.neg.test."],
        )
    return reply(query, rcode=dns.rcode.NXDOMAIN)


@pytest.fixture
def scripted() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream(upstream_answers)
    yield upstream
    upstream.close()


def test_nodata_behind_cname_is_kept_for_the_soa_negative_ttl(
    serve: ServerFactory, scripted: ScriptedUpstream
) -> None:
    srv = serve.start(upstreams=[scripted.address])
    name = "alias.neg.test."
    started = time.monotonic()
    first = udp(srv, name, "AAAA")
    assert first.rcode() == dns.rcode.NOERROR
    assert [(r[1], r[3]) for r in answer_records(first)] == [("CNAME", "edge.neg.test.")]
    assert all(r[4] <= 5 for r in answer_records(first)), "promised longer than it is kept"
    second = tcp(srv, name, "AAAA")  # from the cache: the upstream saw one query
    assert answer_records(second)[0][3] == "edge.neg.test."
    assert scripted.count(name) == 1
    time.sleep(max(0.0, started + 5.5 - time.monotonic()))
    udp(srv, name, "AAAA")
    assert scripted.count(name) == 2, "NODATA behind a CNAME was kept past the SOA's 5 s"


def test_cname_chain_without_soa_is_nodata_with_the_negative_ttl(
    serve: ServerFactory, scripted: ScriptedUpstream
) -> None:
    srv: DnsServer = serve.start(
        upstreams=[scripted.address], env={"VMAGENT_DNS_CACHE_NEGATIVE_TTL": "2"}
    )
    name = "chain.neg.test."
    started = time.monotonic()
    first = udp(srv, name, "AAAA")
    assert [r[1] for r in answer_records(first)] == ["CNAME", "CNAME"]
    assert all(r[4] <= 2 for r in answer_records(first))
    udp(srv, name, "AAAA")
    assert scripted.count(name) == 1, "cached as NODATA"
    time.sleep(max(0.0, started + 2.5 - time.monotonic()))
    udp(srv, name, "AAAA")
    assert scripted.count(name) == 2, "kept past the configured negative TTL"
