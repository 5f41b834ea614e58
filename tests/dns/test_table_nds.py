"""Pushed NameTables built by the table builder child (issue 7 §5): the child decodes the
protobuf bytes *unchecked* and checks the entries while it expands them
(``build_lookup(strict=True)``), so it must give exactly the lookup and exactly the errors of
the checked path (``parse_nds`` = ``parse_name_table(MessageToDict(...))``); it persists the
table as JSON and renders ``/debug/ndsz``. Real child processes, no mocks."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from google.protobuf import json_format

from vmagent._proto import nds_pb2
from vmagent.dns.ndstable import nds_entries, parse_nds
from vmagent.dns.table import (
    Lookup,
    NameTableError,
    TableScope,
    build_lookup,
    parse_name_table,
)
from vmagent.dns.tablebuild import build_nds_in_child, nds_json_chunks, table_json

SCOPE = TableScope("ns1", "cluster.local", ("ns1.svc.cluster.local",))


def sample_table(count: int = 600, shared: bool = True) -> nds_pb2.NameTable:
    """Kubernetes and other registries, IPv4/IPv6/none, alt hosts, wildcards; ``shared``:
    names several entries give (which entry wins then depends on the map's order, which
    differs from one process to the next, as Go's does for Istio)."""
    proto = nds_pb2.NameTable()
    for i in range(count):
        info = proto.table[f"s{i}.ns{i % 4}.svc.cluster.local"]
        info.ips.extend([f"10.0.{i // 250}.{i % 250}", "fd00::1"][: i % 3])
        info.registry = "Kubernetes" if i % 2 else ""
        info.shortname = f"s{i}" if i % 5 or not shared else ""  # "" gives the root name
        info.namespace = f"ns{i % 4}"
        if i % 7 == 0:
            info.alt_hosts.append(f"alt{i}.example")
    proto.table["*.wild.example"].ips.append("10.9.9.9")
    if shared:
        proto.table["shared.example"].ips.append("10.8.8.8")
        proto.table["s3.ns1.svc.cluster.local"].alt_hosts.append("shared.example")
    return proto


def same_lookup(got: Lookup, expected: Lookup) -> None:
    assert (got.entries, got.size, got.search) == (expected.entries, expected.size, expected.search)
    assert dict(got.names.items()) == dict(expected.names.items())


def test_strict_build_of_unchecked_entries_is_the_checked_build() -> None:
    data = sample_table().SerializeToString()
    expected = build_lookup(parse_nds(data), SCOPE)
    same_lookup(build_lookup(nds_entries(data), SCOPE, strict=True), expected)


BAD_ENTRIES = [
    ("s5.ns1.svc.cluster.local", ["10.0.0.1", "not-an-ip"], "Kubernetes"),
    ("bad..name.example", ["10.0.0.2"], ""),
    ("bad..name.example", ["nope"], "Kubernetes"),  # the address is reported first
    ("no-ips..example", [], ""),  # an entry without addresses is checked too
    ("x" * 64 + ".example", ["10.0.0.3"], "Kubernetes"),
]


@pytest.mark.parametrize(("host", "ips", "registry"), BAD_ENTRIES)
def test_strict_build_raises_the_checked_paths_error(
    host: str, ips: list[str], registry: str
) -> None:
    proto = sample_table(50)
    info = proto.table[host]
    info.ips.extend(ips)
    info.registry = registry
    data = proto.SerializeToString()
    document = json_format.MessageToDict(
        nds_entries_message(data), preserving_proto_field_name=True
    )
    with pytest.raises(NameTableError) as checked:
        parse_name_table(document)
    with pytest.raises(NameTableError) as decoded:
        parse_nds(data)
    with pytest.raises(NameTableError) as strict:
        build_lookup(nds_entries(data), SCOPE, strict=True)
    assert str(strict.value) == str(decoded.value) == str(checked.value)
    assert host in str(strict.value)


def nds_entries_message(data: bytes) -> nds_pb2.NameTable:
    message = nds_pb2.NameTable()
    message.ParseFromString(data)
    return message


def test_child_builds_persists_and_renders_a_pushed_table(tmp_path: Path) -> None:
    proto = sample_table(shared=False)  # the child's map order is not this process's
    data = proto.SerializeToString()
    persist = tmp_path / "nametable.json"
    stale = tmp_path / ".nametable.json.k1ll3d.tmp"  # from a writer killed midway
    stale.write_text("{")

    async def scenario() -> None:
        installed: list[Lookup] = []
        await build_nds_in_child(data, SCOPE, installed.append, str(persist))
        (lookup,) = installed
        same_lookup(lookup, build_lookup(parse_nds(data), SCOPE))
        rendered = b"".join([piece async for piece in nds_json_chunks(data, size=4096)])
        assert json.loads(rendered) == json.loads(table_json(parse_nds(data)))

    asyncio.run(scenario())
    assert json.loads(persist.read_text()) == json.loads(table_json(parse_nds(data)))
    assert persist.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nametable.json"]


def test_child_refuses_a_bad_table_and_installs_nothing(tmp_path: Path) -> None:
    proto = sample_table(50)
    proto.table["s7.ns3.svc.cluster.local"].ips.append("300.1.1.1")
    installed: list[Lookup] = []
    with pytest.raises(NameTableError, match=r"s7.ns3.svc.cluster.local: '300.1.1.1' is not"):
        asyncio.run(
            build_nds_in_child(
                proto.SerializeToString(), SCOPE, installed.append, str(tmp_path / "t.json")
            )
        )
    assert installed == [] and not (tmp_path / "t.json").exists()
    with pytest.raises(NameTableError, match="does not decode as a NameTable"):
        asyncio.run(build_nds_in_child(b"\xff\xff\xff", SCOPE, installed.append))


def test_table_in_use_although_it_cannot_be_persisted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = sample_table(50).SerializeToString()
    installed: list[Lookup] = []
    missing = tmp_path / "no-such-dir" / "nametable.json"
    with caplog.at_level(logging.WARNING, logger="vmagent.dns"):
        asyncio.run(build_nds_in_child(data, SCOPE, installed.append, str(missing)))
    assert len(installed) == 1 and installed[0].entries == len(sample_table(50).table)
    assert "cannot persist the name table" in caplog.text and str(missing) in caplog.text
