"""Name table expansion, checked against Istio's agent behaviour (pkg/dns/client/dns.go)."""

from __future__ import annotations

import pytest

from vmagent.dns.table import (
    NameInfo,
    NameTableError,
    TableScope,
    build_lookup,
    parse_name_table,
)
from vmagent.dns.wire import decode_name, encode_name

SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")


def names(table: dict[str, NameInfo], scope: TableScope) -> dict[str, str | None]:
    """Every answered name -> its CNAME target (None for names with addresses)."""
    lookup = build_lookup(table, scope)
    return {
        decode_name(n): (decode_name(r.cname) if r.cname else None) for n, r in lookup.hosts.items()
    }


def k8s(ips: list[str], short: str, ns: str, alt: tuple[str, ...] = ()) -> NameInfo:
    return NameInfo(tuple(ips), "Kubernetes", short, ns, alt)


def test_kubernetes_service_in_own_namespace_gets_istio_alt_hosts() -> None:
    table = {"productpage.ns1.svc.cluster.local": k8s(["9.9.9.9"], "productpage", "ns1")}
    got = names(table, TableScope("ns1", search=SEARCH))
    fqdn = "productpage.ns1.svc.cluster.local."
    assert {n for n, target in got.items() if target is None} == {
        fqdn,
        "productpage.ns1.",
        "productpage.",
        "productpage.ns1.svc.",
    }
    # Only the first search domain is expanded, as CNAMEs to the name itself, and never for a
    # name that already ends in it (reference 3.4 step 5).
    assert "productpage.ns1.svc.cluster.local.ns1.svc.cluster.local." not in got
    assert got["productpage.ns1.ns1.svc.cluster.local."] == "productpage.ns1."
    assert got["productpage.ns1.svc.ns1.svc.cluster.local."] == "productpage.ns1.svc."
    assert "productpage.ns1.svc.cluster.local.svc.cluster.local." not in got
    # "productpage" + search[0] is the FQDN itself, so no CNAME is made for it.
    assert got[fqdn] is None


def test_kubernetes_service_in_other_namespace_has_no_bare_short_name() -> None:
    table = {"details.ns2.svc.cluster.local": k8s(["9.9.9.8"], "details", "ns2")}
    got = names(table, TableScope("ns1"))
    assert set(got) == {"details.ns2.svc.cluster.local.", "details.ns2.", "details.ns2.svc."}


def test_other_cluster_domain_and_external_hosts_answer_only_their_own_name() -> None:
    table = {
        "a.ns1.svc.other.domain": k8s(["1.1.1.1"], "a", "ns1"),
        "www.example.com": NameInfo(("2.2.2.2",), "External"),
        "dotted.example.com.": NameInfo(("3.3.3.3",), "External"),
    }
    got = names(table, TableScope("ns1"))
    assert set(got) == {"a.ns1.svc.other.domain.", "www.example.com.", "dotted.example.com."}


def test_alt_hosts_and_custom_cluster_domain() -> None:
    table = {"s.ns1.svc.corp.example": k8s(["1.1.1.1"], "s", "ns1", ("s.alias.example",))}
    got = names(table, TableScope("ns1", cluster_domain="corp.example"))
    assert set(got) == {
        "s.ns1.svc.corp.example.",
        "s.ns1.",
        "s.",
        "s.ns1.svc.",
        "s.alias.example.",
    }


def test_entries_without_usable_ips_are_skipped() -> None:
    table = {"empty.example.com": NameInfo((), "External")}
    assert names(table, TableScope("ns1")) == {}


def test_wildcards_match_most_specific_first_and_exact_names_win() -> None:
    table = {
        "*.wildcard": NameInfo(("10.10.10.10",), "External"),
        "*.b.wildcard": NameInfo(("11.11.11.11",), "External"),
        "exact.b.wildcard": NameInfo(("12.12.12.12",), "External"),
    }
    lookup = build_lookup(table, TableScope("ns1"))

    def v4(name: str) -> list[str]:
        record = lookup.find(encode_name(name))
        assert record is not None
        return [".".join(map(str, ip)) for ip in record.v4]

    assert v4("a.b.wildcard") == ["11.11.11.11"]
    assert v4("x.y.b.wildcard") == ["11.11.11.11"]
    assert v4("a.wildcard") == ["10.10.10.10"]
    assert v4("exact.b.wildcard") == ["12.12.12.12"]
    assert lookup.find(encode_name("wildcard")) is None
    assert lookup.find(encode_name("other.example")) is None


def test_lookup_is_case_insensitive_through_lower_case_keys() -> None:
    table = {"MiXeD.Example.COM": NameInfo(("1.2.3.4",), "External")}
    lookup = build_lookup(table, TableScope("ns1"))
    assert lookup.find(encode_name("mixed.example.com")) is not None


def test_dual_stack_entry_keeps_both_families() -> None:
    table = {"dual.example.com": NameInfo(("1.2.3.4", "2001:db8::1"), "External")}
    record = build_lookup(table, TableScope("ns1")).find(encode_name("dual.example.com"))
    assert record is not None and len(record.v4) == 1 and len(record.v6) == 1


def test_parse_protobuf_json_mapping() -> None:
    table = parse_name_table(
        {
            "table": {
                "p.ns1.svc.cluster.local": {
                    "ips": ["9.9.9.9"],
                    "registry": "Kubernetes",
                    "shortname": "p",
                    "namespace": "ns1",
                    "altHosts": ["p.alias"],
                }
            }
        }
    )
    assert table["p.ns1.svc.cluster.local"] == NameInfo(
        ("9.9.9.9",), "Kubernetes", "p", "ns1", ("p.alias",)
    )
    assert parse_name_table({}) == {}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "expected a JSON object"),
        ({"table": []}, "'table' must map"),
        ({"tabel": {}}, "unknown keys"),
        ({"table": {"a.com": "1.2.3.4"}}, "a.com: entry must be an object"),
        ({"table": {"a.com": {"ips": "1.2.3.4"}}}, "a.com: ips: expected a list"),
        ({"table": {"a.com": {"ips": ["1.2.3.999"]}}}, "'1.2.3.999' is not an IP"),
        ({"table": {"a.com": {"ips": ["1.2.3.4"], "port": 80}}}, "unknown fields"),
        ({"table": {"a..com": {"ips": ["1.2.3.4"]}}}, "a..com: not a valid DNS name"),
        ({"table": {"a.com": {"ips": ["1.2.3.4"], "registry": 5}}}, "registry: expected a string"),
    ],
)
def test_bad_tables_are_rejected_with_the_host_named(document: object, message: str) -> None:
    with pytest.raises(NameTableError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_name_table(document)


@pytest.mark.parametrize("search0", ["ns1.svc.cluster.local", "NS1.svc.cluster.local."])
def test_no_search_alias_for_names_already_in_the_first_search_domain(search0: str) -> None:
    """Reference 3.4 step 5 (Istio buildDNSAnswers: ``!strings.HasSuffix(h, search[0]+".")``):
    every name ending in search[0] is left without an alias, whatever its registry."""
    table = {
        "productpage.ns1.svc.cluster.local": k8s(["9.9.9.9"], "productpage", "ns1"),
        "reviews.ns2.svc.cluster.local": k8s(["9.9.9.8"], "reviews", "ns2"),
        "ext.ns1.svc.cluster.local": NameInfo(("9.9.9.7",), "External"),
        "*.ns1.svc.cluster.local": NameInfo(("9.9.9.6",), "External"),
    }
    got = names(table, TableScope("ns1", search=(search0, "svc.cluster.local")))
    assert not [n for n in got if n.endswith(".ns1.svc.cluster.local.ns1.svc.cluster.local.")]
    assert got["reviews.ns2.svc.cluster.local.ns1.svc.cluster.local."] == (
        "reviews.ns2.svc.cluster.local."
    )
    assert got["reviews.ns2.ns1.svc.cluster.local."] == "reviews.ns2."
    assert got["productpage.ns1.svc.ns1.svc.cluster.local."] == "productpage.ns1.svc."


def test_wildcard_behind_the_search_domain_answers_the_matched_name() -> None:
    """istio/istio#61732 (open in Istio): ``foo.w.<search0>`` matches the alias of ``*.w``;
    its CNAME target is ``foo.w.``, never the literal ``*.w.``."""
    table = {
        "*.wild.example.com": NameInfo(("1.2.3.4",), "External"),
        "*.b.wild.example.com": NameInfo(("5.6.7.8",), "External"),
    }
    lookup = build_lookup(table, TableScope("ns1", search=SEARCH))
    for question, target, ip in [
        (
            "foo.wild.example.com.ns1.svc.cluster.local.",
            "foo.wild.example.com.",
            b"\x01\x02\x03\x04",
        ),
        (
            "x.y.wild.example.com.ns1.svc.cluster.local.",
            "x.y.wild.example.com.",
            b"\x01\x02\x03\x04",
        ),
        (
            "a.b.wild.example.com.ns1.svc.cluster.local.",
            "a.b.wild.example.com.",
            b"\x05\x06\x07\x08",
        ),
    ]:
        record = lookup.find(encode_name(question))
        assert record is not None and record.cname is not None, question
        assert decode_name(record.cname) == target
        assert record.v4 == (ip,)
    # A direct wildcard match has no CNAME (its addresses are owned by the question).
    record = lookup.find(encode_name("foo.wild.example.com."))
    assert record is not None and record.cname is None
