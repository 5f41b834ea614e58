"""devmesh's data plane over real gRPC + TLS on loopback, delta and state of the world, with
hand-written clients: istiod's ``shouldRespondDelta`` / ``shouldRespond`` (reference §5.1),
versions, removals, NACKs, NameTable and HealthInformation on delta, and EDS following the
WorkloadEntry's health."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from vmagent._proto import nds_pb2

from .devmesh_delta_helpers import (
    CDS,
    EDS,
    LDS,
    RDS,
    decode,
    delta_connected,
    endpoint_addresses,
    names,
)
from .devmesh_xds_helpers import (
    NAME_TABLE,
    XdsClient,
    connected,
    debug,
    devmesh,
    entries,
    eventually,
    node,
)
from .devmesh_xds_helpers import write as write_file

pytestmark = pytest.mark.timeout(60)

MESH = """
namespace: vm
workloadGroups:
  - name: web
    labels: {app: web}
    serviceAccount: web
    template: {ports: {http: 8080}}
    probe: {httpGet: {path: /healthz, port: 8080}}
services:
  - host: web.vm.svc.cluster.local
    addresses: [10.96.1.10]
    ports: [{name: http, port: 80, protocol: HTTP}]
    workloadSelector: {app: web}
  - host: db.vm.svc.cluster.local
    addresses: [10.96.1.11]
    ports: [{name: tcp, port: 5432, protocol: TCP}]
    endpoints: [{address: 10.0.9.9}, {address: 10.0.9.10, ready: false}]
"""

WEB = "outbound|80||web.vm.svc.cluster.local"
DB = "outbound|5432||db.vm.svc.cluster.local"


def mesh_dir(tmp_path: Path, text: str = MESH) -> Path:
    folder = tmp_path / "mesh"
    write_file(folder, "mesh.yaml", text)
    return folder


async def ack_names(envoy: XdsClient, response: discovery_pb2.DiscoveryResponse) -> None:
    """A SotW ACK as Envoy sends it: with the names it watches (an EDS/RDS request without
    names unsubscribes, istiod's ``shouldUnsubscribe``)."""
    await envoy.send(
        discovery_pb2.DiscoveryRequest(
            type_url=response.type_url,
            resource_names=sorted(names(response)) if response.type_url == EDS else [],
            version_info=response.version_info,
            response_nonce=response.nonce,
        )
    )


def web_node() -> object:
    return node("10.0.0.5", "web-0", "vm", AUTO_REGISTER_GROUP="web")


def test_delta_init_resubscribe_new_names_nack_and_health(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            devmesh(tmp_path, mesh_dir(tmp_path)) as mesh,
            delta_connected(mesh, web_node()) as envoy,
        ):
            # Initial wildcard CDS: the full set, each resource with a content version.
            await envoy.subscribe(CDS)
            cds = await envoy.recv_type(CDS)
            assert {WEB, DB, "inbound|8080||", "PassthroughCluster"} <= names(cds)
            assert all(r.version for r in cds.resources) and not cds.removed_resources
            await envoy.ack(cds)
            await envoy.no_response()  # an ACK is not answered

            await envoy.subscribe(EDS, [WEB])
            eds = await envoy.recv_type(EDS)
            # Registered but not yet reported healthy: no endpoint (health-checked group).
            assert endpoint_addresses(decode(eds)[WEB]) == []
            await envoy.ack(eds)

            await envoy.subscribe(LDS)
            lds = await envoy.recv_type(LDS)
            assert {"virtualOutbound", "virtualInbound", "0.0.0.0_80"} <= names(lds)
            assert "10.96.1.11_5432" in names(lds)  # TCP: per VIP and port
            await envoy.ack(lds)
            await envoy.subscribe(RDS, ["80"])
            rds = await envoy.recv_type(RDS)
            (route,) = decode(rds).values()
            assert "web.vm.svc.cluster.local" in route.virtual_hosts[0].domains
            await envoy.ack(rds)

            # NameTable over delta: one unnamed resource.
            await envoy.subscribe(NAME_TABLE)
            nds = await envoy.recv_type(NAME_TABLE)
            assert [r.name for r in nds.resources] == [""]
            await envoy.ack(nds)
            await envoy.no_response()

            # A restarted Envoy re-sending its requests with an empty nonce on the same
            # stream: istiod treats unchanged names as an ACK and answers nothing.
            await envoy.subscribe(CDS)
            await envoy.subscribe(LDS)
            await envoy.subscribe(EDS, [WEB])
            await envoy.subscribe(NAME_TABLE)
            await envoy.no_response()

            # New names are answered, with only those resources.
            await envoy.subscribe(EDS, [DB, "outbound|1||missing.vm.svc.cluster.local"])
            more = await envoy.recv_type(EDS)
            assert names(more) == {DB}
            assert list(more.removed_resources) == ["outbound|1||missing.vm.svc.cluster.local"]
            assert endpoint_addresses(decode(more)[DB]) == [("10.0.9.9", 5432)]  # ready only

            # A NACK is recorded and not answered.
            await envoy.nack(more, "bad endpoints")
            await envoy.no_response()
            _, conns = await debug(mesh, "/debug/connections")
            (conn,) = conns["connections"]
            nacks = conn["watches"][EDS]["nacks"]
            assert [n["message"] for n in nacks] == ["bad endpoints"]

            # Healthy report -> only EDS changes: the endpoint arrives, nothing else.
            await envoy.health(True)
            push = await envoy.recv_type(EDS)
            assert names(push) == {WEB} and not push.removed_resources
            assert endpoint_addresses(decode(push)[WEB]) == [("10.0.0.5", 8080)]
            await envoy.ack(push)
            await envoy.no_response()

            await envoy.health(False, "connection refused")
            push = await envoy.recv_type(EDS)
            assert endpoint_addresses(decode(push)[WEB]) == []
            await envoy.ack(push)

    asyncio.run(scenario())


def test_delta_config_change_pushes_changes_and_removals(tmp_path: Path) -> None:
    async def scenario() -> None:
        folder = mesh_dir(tmp_path)
        async with devmesh(tmp_path, folder) as mesh:
            client = node("10.0.0.7", "client-0", "vm")
            async with delta_connected(mesh, client) as envoy:
                await envoy.subscribe(CDS)
                cds = await envoy.recv_type(CDS)
                versions = {r.name: r.version for r in cds.resources}
                await envoy.ack(cds)
                await envoy.subscribe(LDS)
                await envoy.ack(await envoy.recv_type(LDS))
                await envoy.subscribe(NAME_TABLE)
                table = await envoy.recv_type(NAME_TABLE)
                await envoy.ack(table)

                # db goes away: CDS removes its cluster and sends nothing unchanged; LDS
                # removes its TCP listener; the NameTable (one unnamed resource) is re-sent.
                write_file(folder, "mesh.yaml", MESH.split("  - host: db.vm")[0])
                push = await envoy.recv(timeout=10)
                assert push.type_url == CDS
                assert list(push.removed_resources) == [DB] and not push.resources
                await envoy.ack(push)
                lds = await envoy.recv_type(LDS)
                assert list(lds.removed_resources) == ["10.96.1.11_5432"]
                await envoy.ack(lds)
                nds = await envoy.recv_type(NAME_TABLE)
                assert nds.resources[0].version != table.resources[0].version
                hosts = nds_pb2.NameTable()
                assert nds.resources[0].resource.Unpack(hosts)
                assert set(hosts.table) == {"web.vm.svc.cluster.local"}
                await envoy.ack(nds)
                await envoy.no_response()

                # Reconnect with the versions the client holds: the full set again, and what
                # it holds that no longer exists is removed.
            async with delta_connected(mesh, client) as envoy:
                await envoy.send(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=CDS, initial_resource_versions=versions
                    )
                )
                cds = await envoy.recv_type(CDS)
                assert WEB in names(cds) and DB not in names(cds)
                assert list(cds.removed_resources) == [DB]

    asyncio.run(scenario())


def test_sotw_serves_the_data_plane_and_follows_health(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            devmesh(tmp_path, mesh_dir(tmp_path)) as mesh,
            connected(mesh, web_node()) as envoy,
        ):
            await envoy.send(discovery_pb2.DiscoveryRequest(type_url=CDS))
            cds = await envoy.recv()
            assert cds.type_url == CDS and {WEB, DB} <= names(cds)
            await ack_names(envoy, cds)
            await envoy.send(discovery_pb2.DiscoveryRequest(type_url=EDS, resource_names=[WEB]))
            eds = await envoy.recv()
            assert names(eds) == {WEB}  # only what was asked for
            await ack_names(envoy, eds)
            await envoy.no_response()

            # SotW: an empty nonce on a watched type is a re-init: the full answer again.
            await envoy.send(discovery_pb2.DiscoveryRequest(type_url=CDS))
            again = await envoy.recv()
            assert again.type_url == CDS and names(again) == names(cds)
            await ack_names(envoy, again)
            # istiod's warming rule: after a CDS (re-)init, the next EDS request is answered
            # even though it looks like an ACK.
            await envoy.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=EDS,
                    resource_names=[WEB],
                    version_info=eds.version_info,
                    response_nonce=eds.nonce,
                )
            )
            warm = await envoy.recv()
            assert warm.type_url == EDS and names(warm) == {WEB}
            await ack_names(envoy, warm)

            await envoy.health(True)
            push = await envoy.recv()
            assert push.type_url == EDS
            assert endpoint_addresses(decode(push)[WEB]) == [("10.0.0.5", 8080)]
            await ack_names(envoy, push)
            await envoy.no_response()  # CDS did not change: not re-sent

            # An empty EDS name list unsubscribes (istiod's shouldUnsubscribe): no answer,
            # and health changes no longer push EDS.
            await envoy.send(
                discovery_pb2.DiscoveryRequest(type_url=EDS, response_nonce=push.nonce)
            )
            await envoy.health(False, "down")
            await envoy.no_response()

            async def unhealthy() -> bool:
                return not (await entries(mesh))["web-10.0.0.5"]["healthy"]

            assert await eventually(unhealthy)

    asyncio.run(scenario())


def test_delta_health_as_first_message_is_ignored(tmp_path: Path) -> None:
    """Reference §4.3: istiod ignores a HealthInformation sent as a stream's first message;
    the same holds on delta streams."""

    async def scenario() -> None:
        async with (
            devmesh(tmp_path, mesh_dir(tmp_path)) as mesh,
            delta_connected(mesh, web_node()) as envoy,
        ):
            await envoy.health(True)  # before any request carrying the node
            await envoy.no_response()
            assert await entries(mesh) == {}  # not registered by it either
            await envoy.subscribe(CDS)
            assert WEB in names(await envoy.recv_type(CDS))
            registry = await entries(mesh)
            assert "conditions" not in registry["web-10.0.0.5"]["status"]  # no health yet

    asyncio.run(scenario())


def test_delta_malformed_name_table_hook(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            devmesh(tmp_path, mesh_dir(tmp_path)) as mesh,
            delta_connected(mesh, web_node()) as agent,
        ):
            await agent.subscribe(NAME_TABLE)
            good = await agent.recv_type(NAME_TABLE)
            await agent.ack(good)
            status, _ = await debug(mesh, "/debug/push-malformed?proxy=web-0&kind=bytes", "POST")
            assert status == 200
            bad = await agent.recv_type(NAME_TABLE)
            assert bad.resources[0].resource.value == b"\x0a\xff\xff\xff\xff\x0f"
            await agent.nack(bad, "cannot decode")
            await agent.no_response()  # the good table is not re-sent

    asyncio.run(scenario())
