"""Answers from the name table, exactly as Istio's agent gives them (reference §3.4).

One server for the module: table of ``dnsfixtures.TABLE``, ``--namespace ns1``,
``--search ns1.svc.cluster.local svc.cluster.local cluster.local``, the standard upstream.
"""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from dnsfixtures import (
    MULTI_V4,
    REVIEWS_V4,
    Dnsmasq,
    DnsServer,
    ServerFactory,
    addresses,
    answer_records,
    dig,
    dig_flags,
    question_bytes,
    raw_udp,
    tcp,
    udp,
    wire_answer_records,
    write_resolv_conf,
)

pytestmark = pytest.mark.timeout(60)

IN = int(dns.rdataclass.IN)


@pytest.fixture(scope="module")
def srv(serve_module: ServerFactory) -> DnsServer:
    return serve_module.start()


def assert_table_answer(msg: dns.message.Message) -> None:
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.QR
    assert msg.flags & dns.flags.AA, "table answers are authoritative (AA=1)"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize(
    "name",
    [
        "productpage.ns1.svc.cluster.local.",  # the key
        "productpage.ns1.",  # <shortname>.<namespace>.
        "productpage.ns1.svc.",  # <shortname>.<namespace>.<first label of proxy domain>.
        "productpage.",  # <shortname>. in the proxy's own namespace
        "pp.alt.example.",  # alt_hosts
    ],
)
def test_kubernetes_alt_hosts_answer_a(srv: DnsServer, name: str, transport: str) -> None:
    msg = (udp if transport == "udp" else tcp)(srv, name, "A")
    assert_table_answer(msg)
    assert answer_records(msg) == [(name, "A", IN, "9.9.9.9", 30)]


def test_other_namespace_generates_name_ns_but_not_short_name(
    srv: DnsServer, upstream: Dnsmasq
) -> None:
    msg = udp(srv, "reviews.ns2.", "A")
    assert_table_answer(msg)
    assert sorted(addresses(msg)) == sorted(REVIEWS_V4)
    # "reviews." would only exist for a proxy in ns2: it is not a table name, so it goes upstream.
    before = upstream.count("reviews")
    msg = udp(srv, "reviews.", "A")
    assert not set(addresses(msg)) & set(REVIEWS_V4)
    assert not msg.flags & dns.flags.AA
    assert upstream.count("reviews") == before + 1


def test_aaaa_from_table(srv: DnsServer) -> None:
    msg = udp(srv, "reviews.ns2.svc.cluster.local.", "AAAA")
    assert_table_answer(msg)
    assert answer_records(msg) == [("reviews.ns2.svc.cluster.local.", "AAAA", IN, "fd00::2", 30)]
    msg = tcp(srv, "v6only.", "AAAA")
    assert_table_answer(msg)
    assert addresses(msg, "AAAA") == ["fd00::9"]


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("productpage.ns1.svc.cluster.local.", "AAAA"),  # v4-only service asked for AAAA
        ("v6only.ns1.svc.cluster.local.", "A"),  # v6-only service asked for A
        ("x.wild.example.com.", "AAAA"),  # wildcard without v6
        # search CNAME name without the asked family: empty answer, CNAME omitted
        ("productpage.ns1.ns1.svc.cluster.local.", "AAAA"),
    ],
)
def test_known_name_without_family_is_nodata_not_nxdomain(
    srv: DnsServer, name: str, rdtype: str
) -> None:
    for msg in (udp(srv, name, rdtype), tcp(srv, name, rdtype)):
        assert_table_answer(msg)  # NOERROR, never NXDOMAIN (istio/istio#31250)
        assert msg.answer == []


def test_search_cname_for_first_search_domain(srv: DnsServer) -> None:
    msg = udp(srv, "productpage.ns1.ns1.svc.cluster.local.", "A")
    assert_table_answer(msg)
    assert answer_records(msg) == [
        ("productpage.ns1.ns1.svc.cluster.local.", "CNAME", IN, "productpage.ns1.", 30),
        ("productpage.ns1.", "A", IN, "9.9.9.9", 30),
    ]
    msg = udp(srv, "api.external.com.ns1.svc.cluster.local.", "A")
    assert_table_answer(msg)
    assert answer_records(msg) == [
        ("api.external.com.ns1.svc.cluster.local.", "CNAME", IN, "api.external.com.", 30),
        ("api.external.com.", "A", IN, "1.1.1.1", 30),
    ]


def test_cname_comes_first_then_all_addresses(srv: DnsServer) -> None:
    msg = tcp(srv, "reviews.ns2.ns1.svc.cluster.local.", "A")
    assert_table_answer(msg)
    records = answer_records(msg)
    assert records[0] == ("reviews.ns2.ns1.svc.cluster.local.", "CNAME", IN, "reviews.ns2.", 30)
    assert sorted(records[1:]) == sorted(("reviews.ns2.", "A", IN, ip, 30) for ip in REVIEWS_V4)


def test_later_search_domains_are_not_expanded(srv: DnsServer, upstream: Dnsmasq) -> None:
    # api.external.com.svc.cluster.local exists upstream (10.0.0.77): only search[0] expands.
    before = upstream.count("api.external.com.svc.cluster.local")
    msg = udp(srv, "api.external.com.svc.cluster.local.", "A")
    assert addresses(msg) == ["10.0.0.77"]
    assert upstream.count("api.external.com.svc.cluster.local") == before + 1


def test_name_already_under_search_domain_gets_no_cname(srv: DnsServer) -> None:
    # productpage. + search[0] is the key itself: a plain A answer, no CNAME.
    msg = udp(srv, "productpage.ns1.svc.cluster.local.", "A")
    assert [r[1] for r in answer_records(msg)] == ["A"]


@pytest.mark.parametrize(
    ("name", "ip"),
    [
        ("x.wild.example.com.", "1.2.3.4"),
        ("deep.x.wild.example.com.", "1.2.3.4"),
        ("a.b.wild.example.com.", "5.6.7.8"),  # *.b.wild wins over *.wild
        ("x.y.b.wild.example.com.", "5.6.7.8"),
    ],
)
def test_wildcards_most_specific_first(srv: DnsServer, name: str, ip: str) -> None:
    msg = udp(srv, name, "A")
    assert_table_answer(msg)
    # Owner of a wildcard answer is the question name.
    assert answer_records(msg) == [(name, "A", IN, ip, 30)]


def test_wildcard_parent_itself_is_not_matched(srv: DnsServer, upstream: Dnsmasq) -> None:
    before = upstream.count("wild.example.com")
    msg = udp(srv, "wild.example.com.", "A")
    assert msg.rcode() == dns.rcode.NXDOMAIN  # relayed from the authoritative upstream
    assert upstream.count("wild.example.com") == before + 1


def test_case_insensitive_and_question_echoed_byte_for_byte(srv: DnsServer) -> None:
    for name in ("PrOdUcTpAgE.Ns1.SvC.ClUsTeR.LoCaL.", "X.WILD.example.COM.", "Reviews.NS2."):
        q = dns.message.make_query(name, "A", use_edns=False)
        wire = q.to_wire()
        reply = raw_udp(srv.host, srv.port, wire)
        assert reply is not None
        assert reply[:2] == wire[:2], "ID copied"
        assert question_bytes(reply) == question_bytes(wire), "0x20 case kept in the question"
        msg = dns.message.from_wire(reply)
        assert_table_answer(msg)
        assert addresses(msg)


def test_header_bits_and_class_in(srv: DnsServer) -> None:
    q = dns.message.make_query("reviews.ns2.ns1.svc.cluster.local.", "A", use_edns=False)
    reply = raw_udp(srv.host, srv.port, q.to_wire())
    assert reply is not None
    msg = dns.message.from_wire(reply)
    assert msg.id == q.id
    assert msg.flags & dns.flags.RD, "RD copied from the query"
    assert msg.opcode() == 0
    records = wire_answer_records(reply)
    assert len(records) == 1 + len(REVIEWS_V4)
    assert all(rclass == IN and ttl == 30 for _, rclass, ttl in records)
    # Not recursion-desired: still answered from the table, RD stays clear.
    q = dns.message.make_query("productpage.", "A", use_edns=False, flags=0)
    msg = dns.message.from_wire(raw_udp(srv.host, srv.port, q.to_wire()) or b"")
    assert not msg.flags & dns.flags.RD
    assert addresses(msg) == ["9.9.9.9"]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_round_robin_rotation(srv: DnsServer, transport: str) -> None:
    # Both transports rotate (issue 7: TCP answers used to come in one fixed order).
    ask = udp if transport == "udp" else tcp
    orders = set()
    for _ in range(12):
        msg = ask(srv, "multi.external.com.", "A")
        ips = addresses(msg)
        assert sorted(ips) == sorted(MULTI_V4), "every query gets every address"
        orders.add(tuple(ips))
    assert len({order[0] for order in orders}) >= 2, f"addresses never rotate: {orders}"


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_round_robin_seen_by_dig(srv: DnsServer, dig_tool: None, transport: str) -> None:
    # dig sends a fresh random cookie each time, so no two queries are byte-identical.
    firsts = set()
    for _ in range(8):
        out = dig(srv, "multi.external.com.", "A", "+short", transport).split()
        assert sorted(out) == sorted(MULTI_V4), out
        firsts.add(out[0])
    assert len(firsts) >= 2, f"dig {transport} always sees {firsts}"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_round_robin_keeps_cname_first(srv: DnsServer, transport: str) -> None:
    ask = udp if transport == "udp" else tcp
    firsts = set()
    for _ in range(9):
        records = answer_records(ask(srv, "reviews.ns2.ns1.svc.cluster.local.", "A"))
        assert records[0][1] == "CNAME"
        firsts.add(records[1][3])
    assert len(firsts) >= 2


@pytest.mark.parametrize("rdtype", ["TXT", "MX"])
def test_other_qtypes_of_table_names_are_forwarded_and_not_cached(
    srv: DnsServer, upstream: Dnsmasq, rdtype: str
) -> None:
    name = "productpage.ns1.svc.cluster.local."
    before = upstream.count(name, rdtype)
    first = udp(srv, name, rdtype)
    second = tcp(srv, name, rdtype)
    for msg in (first, second):
        assert msg.rcode() == dns.rcode.NOERROR
        assert [dns.rdatatype.to_text(r.rdtype) for r in msg.answer] == [rdtype]
    # Both went upstream: answers for table names are never cached.
    assert upstream.count(name, rdtype) == before + 2


def test_table_answers_never_go_upstream(srv: DnsServer, upstream: Dnsmasq) -> None:
    name = "productpage.ns1.svc.cluster.local."
    before = upstream.count(name, "A") + upstream.count(name, "AAAA")
    for _ in range(3):
        assert addresses(udp(srv, name, "A")) == ["9.9.9.9"]
        assert udp(srv, name, "AAAA").answer == []
    assert upstream.count(name, "A") + upstream.count(name, "AAAA") == before


def test_ptr_for_table_ip_is_forwarded(srv: DnsServer, upstream: Dnsmasq) -> None:
    before = upstream.count("9.9.9.9.in-addr.arpa")
    msg = udp(srv, "9.9.9.9.in-addr.arpa.", "PTR")
    assert [r[3] for r in answer_records(msg)] == ["ptr.rev.test."]  # the upstream's answer
    assert upstream.count("9.9.9.9.in-addr.arpa") == before + 1


def test_dig_udp_and_tcp(srv: DnsServer, dig_tool: None) -> None:
    out = dig(srv, "productpage.ns1.svc.cluster.local", "A")
    assert "status: NOERROR" in out
    assert {"qr", "aa", "rd"} <= dig_flags(out)
    assert "productpage.ns1.svc.cluster.local. 30 IN A\t9.9.9.9" in out
    out = dig(srv, "+tcp", "+short", "x.wild.example.com")
    assert out.split() == ["1.2.3.4"]
    out = dig(srv, "+short", "productpage.ns1.ns1.svc.cluster.local")
    assert out.split() == ["productpage.ns1.", "9.9.9.9"]
    out = dig(srv, "v6only.ns1.svc.cluster.local", "A")
    assert "status: NOERROR" in out and "ANSWER: 0" in out


def test_dig_0x20(srv: DnsServer, dig_tool: None) -> None:
    out = dig(srv, "+qr", "ProductPage.NS1.svc.Cluster.Local", "A")
    assert "status: NOERROR" in out
    # dig prints the question of the reply; it must keep the client's case.
    assert out.count(";ProductPage.NS1.svc.Cluster.Local.") == 2


def test_ttl_flag(serve: ServerFactory) -> None:
    srv = serve.start(extra=["--ttl", "5"])
    msg = udp(srv, "productpage.ns1.ns1.svc.cluster.local.", "A")
    assert [r[4] for r in answer_records(msg)] == [5, 5]


def test_namespace_from_environment(serve: ServerFactory) -> None:
    srv = serve.start(namespace=None, env={"POD_NAMESPACE": "ns2"}, probe="reviews.")
    assert sorted(addresses(udp(srv, "reviews.", "A"))) == sorted(REVIEWS_V4)
    # productpage. is not generated for a proxy in ns2
    assert "9.9.9.9" not in addresses(udp(srv, "productpage.", "A"))


def test_cluster_domain_flag(serve: ServerFactory) -> None:
    table = {
        "table": {
            "web.ns1.svc.corp.internal": {
                "ips": ["10.9.0.1"],
                "registry": "Kubernetes",
                "shortname": "web",
                "namespace": "ns1",
            }
        }
    }
    srv = serve.start(
        table=table,
        search=["ns1.svc.corp.internal"],
        extra=["--cluster-domain", "corp.internal"],
        probe="web.ns1.svc.corp.internal.",
    )
    for name in ("web.ns1.svc.corp.internal.", "web.ns1.", "web.ns1.svc.", "web."):
        assert addresses(udp(srv, name, "A")) == ["10.9.0.1"], name


def test_first_search_domain_from_resolv_conf(serve: ServerFactory, tmp_path: Path) -> None:
    resolv = write_resolv_conf(tmp_path / "resolv.conf", ["127.0.0.1"], ["corp.example"])
    srv = serve.start(search=None, resolv_conf=resolv)
    msg = udp(srv, "productpage.ns1.corp.example.", "A")
    assert answer_records(msg) == [
        ("productpage.ns1.corp.example.", "CNAME", IN, "productpage.ns1.", 30),
        ("productpage.ns1.", "A", IN, "9.9.9.9", 30),
    ]


def test_non_kubernetes_and_foreign_domain_entries_answer_only_their_key(
    serve: ServerFactory,
) -> None:
    table = {
        "table": {
            # not Kubernetes: no short names even with shortname/namespace set
            "ext.ns1.svc.cluster.local": {
                "ips": ["10.5.0.1"],
                "registry": "External",
                "shortname": "ext",
                "namespace": "ns1",
            },
            # no addresses at all: no entry
            "empty.example.com": {"ips": [], "registry": "External"},
            # Kubernetes, but not under the proxy domain svc.cluster.local: the key only
            "foreign.other.domain": {
                "ips": ["10.5.0.2"],
                "registry": "Kubernetes",
                "shortname": "foreign",
                "namespace": "ns1",
            },
        }
    }
    srv = serve.start(table=table, search=[], probe="ext.ns1.svc.cluster.local.")
    assert addresses(udp(srv, "ext.ns1.svc.cluster.local.")) == ["10.5.0.1"]
    assert addresses(udp(srv, "FOREIGN.other.domain.")) == ["10.5.0.2"]
    # forwarded: the upstream (authoritative for example.com) says NXDOMAIN, not table NODATA
    assert udp(srv, "empty.example.com.").rcode() == dns.rcode.NXDOMAIN
    for name in ("ext.", "ext.ns1.", "ext.ns1.svc.", "foreign.", "foreign.ns1."):
        msg = udp(srv, name)
        assert not msg.flags & dns.flags.AA, name
        assert not [ip for ip in addresses(msg) if ip.startswith("10.5.")], name


def test_protobuf_json_names_accepted(serve: ServerFactory) -> None:
    # The protobuf JSON mapping: "altHosts" (lowerCamelCase) means alt_hosts, and a missing
    # "registry" is the empty string (a non-Kubernetes entry).
    table = {
        "table": {
            "camel.ns1.svc.cluster.local": {
                "ips": ["10.5.1.1"],
                "registry": "Kubernetes",
                "shortname": "camel",
                "namespace": "ns1",
                "altHosts": ["camel.alias.example"],
            },
            "plain.example.com": {"ips": ["10.5.1.2"]},
        }
    }
    srv = serve.start(table=table, probe="camel.ns1.svc.cluster.local.")
    assert addresses(udp(srv, "camel.alias.example.")) == ["10.5.1.1"]
    assert addresses(udp(srv, "camel.")) == ["10.5.1.1"]
    assert addresses(udp(srv, "plain.example.com.")) == ["10.5.1.2"]


def test_empty_table_object_is_valid(serve: ServerFactory, upstream: Dnsmasq) -> None:
    srv = serve.start(table={}, probe="www.up.test.")  # {} is an empty NameTable
    assert addresses(udp(srv, "www.up.test.")) == ["10.0.0.1"]
    assert srv.alive()
