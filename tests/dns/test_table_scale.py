"""The compact lookup layout (issue 7 §5) answers exactly as the one-record-per-name layout did.

``reference_hosts``/``reference_find`` are the previous ``build_lookup``/``Lookup.find``, kept
verbatim (one HostRecord per name, addresses parsed with ``ipaddress``, names encoded one by
one): every table below, hand-written edge cases and seeded random ones, must give the same
record for every answered name and for every question asked, and the same DNS answers from
the core (A/AAAA, CNAME for the search alias, round robin)."""

from __future__ import annotations

import gc
import ipaddress
import random
from collections.abc import Mapping

import dnslib
import pytest

from vmagent.dns.core import DnsCore
from vmagent.dns.nameindex import NameIndex
from vmagent.dns.table import (
    HostRecord,
    NameInfo,
    TableScope,
    alt_hosts,
    build_lookup,
    parse_name_table,
)
from vmagent.dns.wire import WireError, encode_name

SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")


# --- the previous layout, verbatim -----------------------------------------------------------


def _ref_wire(name: str) -> bytes | None:
    try:
        return encode_name(name)
    except (WireError, UnicodeError):
        return None


def _ref_split_ips(ips: tuple[str, ...]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    v4: list[bytes] = []
    v6: list[bytes] = []
    for text in ips:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        (v4 if address.version == 4 else v6).append(address.packed)
    return tuple(v4), tuple(v6)


def reference_hosts(table: Mapping[str, NameInfo], scope: TableScope) -> dict[bytes, HostRecord]:
    name4: dict[bytes, tuple[bytes, ...]] = {}
    name6: dict[bytes, tuple[bytes, ...]] = {}
    cnames: dict[bytes, bytes] = {}
    all_hosts: dict[bytes, None] = {}
    search = scope.search[0].lower().rstrip(".") + "." if scope.search else ""
    for host, info in table.items():
        v4, v6 = _ref_split_ips(info.ips)
        if not v4 and not v6:
            continue
        names = alt_hosts(host, info, scope)
        wire_names = {_ref_wire(n) for n in names}
        for name in names:
            wire = _ref_wire(name)
            if wire is None:
                continue
            all_hosts[wire] = None
            if v4:
                name4[wire] = v4
            if v6:
                name6[wire] = v6
            if search and not name.lower().endswith(search):
                expanded = _ref_wire(name.lower() + search)
                if expanded is not None and expanded not in wire_names:
                    cnames[expanded] = wire
                    all_hosts[expanded] = None
    hosts: dict[bytes, HostRecord] = {}
    for wire in all_hosts:
        target = cnames.get(wire)
        final = target if target is not None else wire
        hosts[wire] = HostRecord(target, name4.get(final, ()), name6.get(final, ()))
    return hosts


def reference_find(hosts: Mapping[bytes, HostRecord], name: bytes) -> HostRecord | None:
    record = hosts.get(name)
    if record is not None:
        return record
    off = 0
    while name[off]:
        off += 1 + name[off]
        record = hosts.get(b"\x01*" + name[off:])
        if record is not None:
            cname = record.cname
            if cname is not None and cname.startswith(b"\x01*"):
                return HostRecord(name[:off] + cname[2:], record.v4, record.v6)
            return record
    return None


# --- tables ----------------------------------------------------------------------------------


def k8s(ips: list[str], short: str, ns: str, alt: tuple[str, ...] = ()) -> NameInfo:
    return NameInfo(tuple(ips), "Kubernetes", short, ns, alt)


def ext(ips: list[str]) -> NameInfo:
    return NameInfo(tuple(ips), "External")


EDGE_TABLE: dict[str, NameInfo] = {
    "productpage.ns1.svc.cluster.local": k8s(
        ["9.9.9.9", "9.9.9.8", "9.9.9.7"], "productpage", "ns1"
    ),
    "reviews.ns2.svc.cluster.local": k8s(["10.0.0.2", "2001:db8::2"], "reviews", "ns2", ("rv",)),
    # the same names again later: per family, the later entry wins
    "reviews.ns2.svc.cluster.local.": k8s(["2001:db8::3"], "reviews", "ns2"),
    "v6only.example.com": ext(["2001:db8::1"]),
    "dual.example.com": ext(["1.1.1.1", "2001:db8::11", "not-an-ip", "fe80::1%eth0"]),
    "noips.example.com": ext([]),
    "badips.example.com": ext(["999.1.1.1", "01.2.3.4"]),
    "*.wild.example.com": ext(["1.2.3.4"]),
    "*.example.com": ext(["1.2.3.5"]),
    # ends in the search domain as text: no alias
    "x.ns1.svc.cluster.local": ext(["5.5.5.5"]),
    "xns1.svc.cluster.local": ext(["5.5.5.6"]),
    # a direct name that is also the search alias of another name: the alias wins
    "short.ns1.svc.cluster.local": ext(["6.6.6.6"]),
    "short": ext(["6.6.6.7"]),
    "trailing.dots.example.com..": ext(["7.7.7.7"]),
    "UPPER.Example.COM": ext(["8.8.8.8"]),
    "bücher.example": ext(["8.8.4.4"]),
    ("l" * 60 + ".") * 3 + "l" * 40 + ".example.com": ext(
        ["8.8.8.9"]
    ),  # alias would pass 255 bytes
    "big.example.com": ext([f"10.1.{i // 250}.{i % 250}" for i in range(40)]),
}


def random_table(seed: int, count: int) -> dict[str, NameInfo]:
    rng = random.Random(seed)
    table: dict[str, NameInfo] = {}
    for i in range(count):
        ns = f"ns{rng.randrange(4)}"
        short = f"s{rng.randrange(count)}"
        ips = [
            rng.choice(
                [f"10.{i % 256}.{rng.randrange(256)}.{rng.randrange(256)}", f"2001:db8::{i:x}"]
            )
            for _ in range(rng.choice([0, 1, 1, 1, 2, 5]))
        ]
        kind = rng.random()
        if kind < 0.6:
            alt = tuple(
                rng.choice(["", f"{short}.alt", f"a{i}.ns1.svc.cluster.local"]) for _ in "x"
            )
            table[f"{short}.{ns}.svc.cluster.local"] = k8s(
                ips, short, ns, tuple(a for a in alt if a)
            )
        elif kind < 0.8:
            table[f"{short}.example.com"] = ext(ips)
        elif kind < 0.9:
            table[f"*.w{rng.randrange(5)}.example.com"] = ext(ips)
        else:
            table[f"{short}.ns1.svc.cluster.local"] = ext(ips)
    return table


SCOPES = [
    TableScope("ns1", search=SEARCH),
    TableScope("ns2", search=("ns2.svc.cluster.local",)),
    TableScope("ns1"),
    TableScope("ns1", search=("Ns1.Svc.Cluster.Local.",)),
    TableScope("ns1", search=("bad..search",)),
    TableScope("ns1", cluster_domain="corp.example", search=("ns1.svc.corp.example",)),
]


def questions(table: Mapping[str, NameInfo], hosts: Mapping[bytes, HostRecord]) -> list[bytes]:
    asked = set(hosts)
    for host in table:
        for suffix in ("", ".ns1.svc.cluster.local", ".svc.cluster.local", ".nope"):
            wire = _ref_wire("foo." + host.replace("*.", "") + suffix)
            if wire is not None:
                asked.add(wire)
    asked.add(b"\x00")
    return sorted(asked)


def assert_same(table: Mapping[str, NameInfo], scope: TableScope) -> None:
    expected = reference_hosts(table, scope)
    lookup = build_lookup(table, scope)
    assert dict(lookup.hosts) == expected
    assert len(lookup.hosts) == len(expected)
    for name in questions(table, expected):
        assert lookup.find(name) == reference_find(expected, name), name


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", SCOPES, ids=lambda s: f"{s.namespace}-{s.search}")
def test_compact_layout_matches_the_previous_records_on_edge_cases(scope: TableScope) -> None:
    assert_same(EDGE_TABLE, scope)


@pytest.mark.parametrize("seed", range(6))
def test_compact_layout_matches_the_previous_records_on_random_tables(seed: int) -> None:
    table = random_table(seed, 300)
    for scope in SCOPES[:3]:
        assert_same(table, scope)


def test_a_services_alias_names_share_one_value() -> None:
    """One encoded answer per service, whatever its number of names (the memory target)."""
    table = {
        f"s{i}.ns{i % 3}.svc.cluster.local": k8s([f"10.0.0.{i}"], f"s{i}", f"ns{i % 3}")
        for i in range(50)
    }
    lookup = build_lookup(table, TableScope("ns1", search=SEARCH))
    index = lookup.names
    assert isinstance(index, NameIndex)
    assert len(index) == 167 and len(lookup.hosts) == len(list(lookup.hosts)) == 300
    # one value per service; two in ns1, whose full names end in the search domain (no alias)
    assert index.distinct_values == 33 + 2 * 17
    assert index.nbytes < 167 * 40


def test_lookup_gives_the_garbage_collector_a_handful_of_objects_whatever_its_size() -> None:
    """Flat buffers: a 100k-service table adds no work to a collection pass (one HostRecord
    per name made every full pass walk 600k objects: the 60-115 ms stalls)."""
    for services in (10, 3000):
        lookup = build_lookup(random_table(1, services), TableScope("ns1", search=SEARCH))
        parts = [getattr(lookup.names, slot) for slot in NameIndex.__slots__]
        assert sum(gc.is_tracked(p) for p in [lookup, lookup.names, *parts]) <= 6


def test_parse_name_table_checks_ips_as_before() -> None:
    good = ["1.2.3.4", "::1", "2001:db8::1", "::ffff:1.2.3.4", "fe80::1%eth0", "0.0.0.0"]
    bad = ["1.2.3", "01.2.3.4", "256.1.1.1", "1.2.3.4 ", "", "1.2.3.4\x00", "::1::", "x"]
    for ip in good:
        parse_name_table({"table": {"h.example": {"ips": [ip]}}})
    for ip in bad:
        with pytest.raises(ValueError, match="is not an IP address"):
            parse_name_table({"table": {"h.example": {"ips": [ip]}}})


def _answers(core: DnsCore, name: str, qtype: str) -> list[tuple[str, str, str]]:
    packet = bytes(dnslib.DNSRecord.question(name, qtype).pack())
    reply = core.handle(packet, 0.0, False)
    if not isinstance(reply, bytes):
        return [("forwarded", "", "")]
    parsed = dnslib.DNSRecord.parse(reply)
    return [(str(rr.rname), dnslib.QTYPE[rr.rtype], str(rr.rdata)) for rr in parsed.rr]


class _ReferenceLookup:
    """The previous lookup's interface, for a core fed the reference records."""

    def __init__(self, hosts: dict[bytes, HostRecord], entries: int) -> None:
        self.hosts = hosts
        self.entries = entries

    def find(self, name: bytes) -> HostRecord | None:
        return reference_find(self.hosts, name)


@pytest.mark.parametrize("qtype", ["A", "AAAA"])
def test_core_answers_match_the_previous_layout(qtype: str) -> None:
    """Whole DNS answers, three times each (round robin turns): alias names, the CNAME of
    the search alias, wildcards, AAAA/A."""
    scope = TableScope("ns1", search=SEARCH)
    new, old = DnsCore(), DnsCore()
    new.set_lookup(build_lookup(EDGE_TABLE, scope), 0.0)
    old.set_lookup(_ReferenceLookup(reference_hosts(EDGE_TABLE, scope), len(EDGE_TABLE)), 0.0)  # type: ignore[arg-type]
    asked = [
        "productpage.ns1.svc.cluster.local",
        "productpage.ns1",
        "productpage",
        "productpage.ns1.svc",
        "productpage.ns1.ns1.svc.cluster.local",
        "productpage.ns1.svc.cluster.local.ns1.svc.cluster.local",
        "rv.ns1.svc.cluster.local",
        "reviews.ns2.svc.cluster.local",
        "foo.wild.example.com",
        "foo.wild.example.com.ns1.svc.cluster.local",
        "dual.example.com",
        "big.example.com",
        "short.ns1.svc.cluster.local",
        "v6only.example.com.ns1.svc.cluster.local",
    ]
    for name in asked:
        for _ in range(3):
            assert _answers(new, name, qtype) == _answers(old, name, qtype), name
