"""Table swaps after the issue 7 §5 rework: a table file's reload (read on a thread, parsed and
built in slices on the event loop, the table not kept) and a control-plane push (the table
kept: the agent shows and persists it) still swap the whole table in, aliases included, and a
search-list change rebuilds from the current table. Real ``vmagent dns serve`` processes and
real sockets; correctness only (the timing targets are measured by
``bench/dns_table_bench.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest
from dnsfixtures import (
    LOOPBACK,
    ServerFactory,
    addresses,
    answer_records,
    free_port,
    udp,
    wait_until,
    write_resolv_conf,
    write_table,
)

from vmagent.config import load_config
from vmagent.dns.service import DnsProxy, run_in_slices
from vmagent.dns.steps import run_steps
from vmagent.dns.table import (
    NameInfo,
    NameTableError,
    TableScope,
    build_lookup_steps,
    parse_name_table,
)
from vmagent.dns.tablebuild import BuilderFailed, build_in_child, decode_lookup, encode_lookup
from vmagent.dns.tablefile import CHUNK_ENTRIES, read_name_table, table_json_steps

SERVICES = 3000  # many slices of work, still quick


def address(i: int, version: int) -> str:
    return f"{10 + version}.0.{i // 250}.{i % 250 + 1}"


def big_table(version: int, services: int = SERVICES) -> dict[str, Any]:
    table: dict[str, Any] = {
        f"s{i}.ns{i % 3}.svc.cluster.local": {
            "ips": [address(i, version)],
            "registry": "Kubernetes",
            "shortname": f"s{i}",
            "namespace": f"ns{i % 3}",
        }
        for i in range(services)
    }
    table["api.example.com"] = {"ips": [address(0, version)], "registry": "External"}
    return {"table": table}


def a(server: Any, name: str) -> list[str]:
    return addresses(udp(server, name))


# --- table files -----------------------------------------------------------------------------


def test_file_swap_answers_every_query_and_ends_on_the_new_table(
    serve: ServerFactory, tmp_path: Path
) -> None:
    path = write_table(tmp_path / "table.json", big_table(0))
    server = serve.start(name_table=path, probe="s1.ns1.svc.cluster.local.")
    last = SERVICES - 1
    assert a(server, f"s{last}.ns{last % 3}.svc.cluster.local") == [address(last, 0)]

    write_table(path, big_table(1))
    server.signal()
    seen = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # bounded: 20 s, ~1000 queries at most
        reply = udp(server, "s7.ns1.svc.cluster.local", timeout=2.0)
        assert reply.rcode() == 0, reply  # every query answered during the swap
        seen.add(tuple(addresses(reply)))
        if (address(7, 1),) in seen:
            break
        time.sleep(0.02)
    assert seen <= {(address(7, 0),), (address(7, 1),)}
    assert (address(7, 1),) in seen, server.output()
    # The whole table moved: other names, short names, the search-domain alias (CNAME).
    assert a(server, f"s{last}.ns{last % 3}.svc.cluster.local") == [address(last, 1)]
    assert a(server, "s4.ns1") == [address(4, 1)]
    assert a(server, "s4") == [address(4, 1)]  # ns1 is the proxy's namespace
    assert answer_records(udp(server, "s5.ns2.ns1.svc.cluster.local"))[:1] == [
        ("s5.ns2.ns1.svc.cluster.local.", "CNAME", 1, "s5.ns2.", 30)
    ]
    assert a(server, "s5.ns2.ns1.svc.cluster.local") == [address(5, 1)]
    assert "name table loaded: 3001 entries" in server.output()


def test_search_change_rebuilds_from_the_table_file_as_it_is_now(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """``dns serve`` does not keep the parsed table: a new search list re-reads the file."""
    path = write_table(tmp_path / "table.json", big_table(0, 30))
    resolv = write_resolv_conf(tmp_path / "resolv.conf", [LOOPBACK], ["ns1.svc.cluster.local"])
    server = serve.start(name_table=path, resolv_conf=resolv, search=None, probe="s1.ns1.")
    assert a(server, "api.example.com.ns1.svc.cluster.local") == [address(0, 0)]

    write_table(path, big_table(1, 30))
    server.signal()
    assert wait_until(lambda: a(server, "api.example.com") == [address(0, 1)], 10)
    write_resolv_conf(resolv, [LOOPBACK], ["ns2.svc.cluster.local"])
    alias = "api.example.com.ns2.svc.cluster.local"
    assert wait_until(lambda: a(server, alias) == [address(0, 1)], 10), server.output()
    assert answer_records(udp(server, alias))[0][1:4] == ("CNAME", 1, "api.example.com.")
    # the old search domain's alias is gone (forwarded: the upstream does not know it)
    assert a(server, "api.example.com.ns1.svc.cluster.local") == []


def test_a_bad_file_keeps_the_big_table(serve: ServerFactory, tmp_path: Path) -> None:
    path = write_table(tmp_path / "table.json", big_table(0))
    server = serve.start(name_table=path, probe="s1.ns1.svc.cluster.local.")
    bad = big_table(1)
    bad["table"]["s9.ns0.svc.cluster.local"]["ips"] = ["not-an-ip"]
    write_table(path, bad)
    server.signal()
    assert wait_until(lambda: "not-an-ip" in server.output(), 10)
    assert "s9.ns0.svc.cluster.local: 'not-an-ip' is not an IP address" in server.output()
    assert a(server, "s9.ns0.svc.cluster.local") == [address(9, 0)]
    assert server.alive()


# --- the proxy in process: tables pushed by the control plane --------------------------------


def _proxy_config(tmp_path: Path, port: int, search: str) -> Any:
    resolv = write_resolv_conf(tmp_path / "resolv.conf", [LOOPBACK], [search])
    env = {
        "VMAGENT_CLUSTER_ENV": os.devnull,
        "VMAGENT_MESH_CONFIG": os.devnull,
        "DNS_PROXY_ADDR": f"{LOOPBACK}:{port}",
        "VMAGENT_DNS_UPSTREAMS": f"{LOOPBACK}:9",
        "VMAGENT_RESOLV_CONF": str(resolv),
        "POD_NAMESPACE": "ns1",
    }
    return load_config(env), resolv


def _ask(port: int, name: str) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, "A"), LOOPBACK, timeout=3.0, port=port)


def test_pushed_tables_are_swapped_in_and_kept_for_the_agent(tmp_path: Path) -> None:
    """What the agent does with an NDS push: ``update_table(table)`` (kept, not emptied: the
    agent's status and persisted copy use the same object); a new search list rebuilds it."""
    port = free_port()
    config, resolv = _proxy_config(tmp_path, port, "ns1.svc.cluster.local")

    async def scenario() -> None:
        proxy = DnsProxy(config)
        await proxy.start()
        try:
            first = parse_name_table(big_table(0))
            await proxy.update_table(first)
            got = await asyncio.to_thread(_ask, port, "s2.ns2.svc.cluster.local")
            assert addresses(got) == [address(2, 0)]
            second = parse_name_table(big_table(1))
            await proxy.update_table(second)
            assert len(second) == SERVICES + 1 and len(first) == SERVICES + 1  # untouched
            got = await asyncio.to_thread(_ask, port, "s2.ns2.ns1.svc.cluster.local")
            assert addresses(got) == [address(2, 1)]
            write_resolv_conf(resolv, [LOOPBACK], ["ns2.svc.cluster.local"])
            assert proxy._read_resolv_conf()
            await proxy._rebuild()
            got = await asyncio.to_thread(_ask, port, "s3.ns0.ns2.svc.cluster.local")
            assert [r[1] for r in answer_records(got)] == ["CNAME", "A"]
            assert addresses(got) == [address(3, 1)]
        finally:
            await proxy.close()

    asyncio.run(scenario())


def test_a_table_given_with_its_source_is_handed_over(tmp_path: Path) -> None:
    """``update_table(table, source)``: the proxy empties the table once built (its memory
    is not kept) and gets it again from ``source`` when the search list changes."""
    port = free_port()
    config, resolv = _proxy_config(tmp_path, port, "ns1.svc.cluster.local")
    calls: list[int] = []

    async def source() -> dict[str, NameInfo]:
        calls.append(1)
        return parse_name_table(big_table(1, 20))

    async def scenario() -> None:
        proxy = DnsProxy(config)
        await proxy.start()
        try:
            table = parse_name_table(big_table(0, 20))
            await proxy.update_table(table, source)
            assert table == {} and calls == []
            got = await asyncio.to_thread(_ask, port, "s3.ns0.svc.cluster.local")
            assert addresses(got) == [address(3, 0)]
            write_resolv_conf(resolv, [LOOPBACK], ["ns2.svc.cluster.local"])
            assert proxy._read_resolv_conf()
            await proxy._rebuild()
            assert calls == [1]
            got = await asyncio.to_thread(_ask, port, "s3.ns0.ns2.svc.cluster.local")
            assert addresses(got) == [address(3, 1)]
        finally:
            await proxy.close()

    asyncio.run(scenario())


# --- the stepwise parsers --------------------------------------------------------------------


DOCUMENTS = [
    json.dumps(big_table(0, 250)),
    json.dumps(big_table(0, 250), indent=2),
    '{"table": null}',
    "{}",
    ' { "table" : { } } ',
    '{"table": {"a.example": {"ips": ["1.2.3.4"], "altHosts": ["b.example"]}}}',
    '{"table": {"a.example": {"ips": ["1.2.3.4"]}, "a.example": {"ips": ["5.6.7.8"]}}}',
    '{"table": {"a.example": {"ips": ["bad"]}, "a.example": {"ips": ["5.6.7.8"]}}}',
    '{"table": {"a.example": {"ips": ["1.2.3.4"]}}, "table": {}}',
    '{"table": {"a.example": {"ips": ["1.2.3.4"]}}, "extra": 1}',
    '{"extra": 1, "table": {"a.example": {"ips": ["x"]}}}',
    '{"table": {"a.example": {"ips": ["1.2.3.4"]}, "b.example": {"ips": ["x"]}}}',
    '{"table": {"a.example": {"ips": ["x"]}, "b.example": {"ips": ["1.2.3.4"]},}}',
    '{"table": {"a.example": {"ips": ["1.2.3.4"]}}',
    '{"table": {"a.example": {"ips": ["1.2.3.4"]}}} trailing',
    '{"table": []}',
    "[]",
    "\ufeff{}",
    '{"table": {"a.example": 5}}',
]


@pytest.mark.parametrize("text", DOCUMENTS, ids=range(len(DOCUMENTS)))
def test_stepwise_parse_gives_the_same_table_or_error_as_json_loads(text: str) -> None:
    def exact() -> Any:
        return parse_name_table(json.loads(text))

    try:
        expected: Any = exact()
    except (NameTableError, ValueError) as exc:
        with pytest.raises(type(exc)) as raised:
            run_steps(table_json_steps(text))
        assert str(raised.value) == str(exc)
        return
    got = run_steps(table_json_steps(text))
    assert got == expected and list(got) == list(expected)


def test_parse_and_build_give_the_event_loop_a_turn_every_few_entries() -> None:
    text = json.dumps(big_table(0, 1000))
    steps = table_json_steps(text)
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            table = done.value
            break
        yields += 1
    assert yields >= 1000 // CHUNK_ENTRIES - 1
    build = build_lookup_steps(table, TableScope("ns1", search=("ns1.svc.cluster.local",)))
    assert sum(1 for _ in build) >= 10


def test_run_in_slices_answers_like_running_through() -> None:
    table = parse_name_table(big_table(0, 500))
    scope = TableScope("ns1", search=("ns1.svc.cluster.local",))
    sliced = asyncio.run(run_in_slices(build_lookup_steps(table, scope), budget=0.0))
    whole = run_steps(build_lookup_steps(table, scope))
    assert dict(sliced.hosts) == dict(whole.hosts)


# --- the child-process builder ---------------------------------------------------------------


def test_lookup_sent_by_the_builder_answers_the_same() -> None:
    table = parse_name_table(big_table(0, 300))
    lookup = run_steps(
        build_lookup_steps(table, TableScope("ns1", search=("ns1.svc.cluster.local",)))
    )
    copy = decode_lookup(encode_lookup(lookup))
    assert dict(copy.hosts) == dict(lookup.hosts)
    assert (copy.entries, copy.size, copy.search) == (lookup.entries, lookup.size, lookup.search)
    with pytest.raises(BuilderFailed):
        decode_lookup(encode_lookup(lookup)[:-1])
    with pytest.raises(NameTableError, match=r"^t\.json: bad$"):
        decode_lookup(b"Et.json: bad")


def test_builder_child_reports_a_bad_table_like_the_file_reader(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"table": {"a.example": {"ips": ["x"]}}}')
    scope = TableScope("ns1")
    with pytest.raises(NameTableError) as raised:
        asyncio.run(build_in_child(str(path), scope))
    with pytest.raises(NameTableError) as expected:
        read_name_table(str(path))
    assert str(raised.value) == str(expected.value)


def test_without_a_child_the_table_is_built_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no child can run (no interpreter at ``sys.executable``), the file's table still
    gets in, read and built by the proxy's own process."""
    port = free_port()
    config, _ = _proxy_config(tmp_path, port, "ns1.svc.cluster.local")
    path = write_table(tmp_path / "table.json", big_table(0, 20))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))
    reads: list[int] = []

    async def source() -> dict[str, NameInfo]:
        reads.append(1)
        return read_name_table(str(path))

    async def scenario() -> None:
        proxy = DnsProxy(config)
        await proxy.start()
        try:
            await proxy.update_from_file(str(path), source, at_start=True)  # built at once
            got = await asyncio.to_thread(_ask, port, "s3.ns0.ns1.svc.cluster.local")
            assert addresses(got) == [address(3, 0)] and reads == []
            write_table(path, big_table(1, 20))
            await proxy.update_from_file(str(path), source)  # a reload: the child's job
            got = await asyncio.to_thread(_ask, port, "s3.ns0.ns1.svc.cluster.local")
            assert addresses(got) == [address(3, 1)] and reads == [1]
        finally:
            await proxy.close()

    asyncio.run(scenario())


def test_pushed_table_decodes_as_its_protobuf_json_mapping() -> None:
    """The NDS decode goes a chunk of entries at a time (no whole-table dict): the same table,
    in the same order, as ``parse_name_table(MessageToDict(...))``, and the same errors."""
    from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
    from google.protobuf import json_format

    from vmagent._proto import nds_pb2
    from vmagent.xds.session import decode_name_table

    proto = nds_pb2.NameTable()
    for i in range(2500):
        info = proto.table[f"s{i}.ns{i % 10}.svc.cluster.local"]
        info.ips.extend([f"10.0.{i // 250}.{i % 250}", "fd00::1"][: i % 3])
        info.registry = "Kubernetes" if i % 2 else ""
        info.shortname = f"s{i}" if i % 5 else ""
        info.namespace = f"ns{i % 10}"
        if i % 7 == 0:
            info.alt_hosts.append(f"alt{i}.example")
    response = DiscoveryResponse()
    response.resources.add().Pack(proto)
    received = nds_pb2.NameTable()
    response.resources[0].Unpack(received)  # as decoded: map order is the message's own
    expected = parse_name_table(
        json_format.MessageToDict(received, preserving_proto_field_name=True)
    )
    got = decode_name_table(response)
    assert got == expected and list(got) == list(expected)

    proto.table["s1700.ns0.svc.cluster.local"].ips.append("not-an-ip")
    response.resources[0].Pack(proto)
    with pytest.raises(NameTableError, match="'not-an-ip' is not an IP address"):
        decode_name_table(response)
