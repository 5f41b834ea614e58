"""The dev control plane over real gRPC + TLS on loopback, against a hand-written xDS client
that speaks as Istio's agent does: NDS per namespace, pushes, ACK/NACK, auto-registration,
health, grace-period cleanup."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from vmagent._proto import nds_pb2

from .devmesh_xds_helpers import (
    NAME_TABLE,
    connected,
    debug,
    devmesh,
    entries,
    eventually,
    node,
    write,
)

pytestmark = pytest.mark.timeout(60)

SHOP = """
namespace: shop
services:
  - host: cart.shop.svc.cluster.local
    addresses: [10.96.0.10]
    ports: [{name: http, port: 80}]
  - host: secret.shop.svc.cluster.local
    addresses: [10.96.0.11]
    exportTo: ["."]
    ports: [{name: http, port: 80}]
  - host: api.example.com
    registry: External
    resolution: DNS
    ports: [{name: https, port: 443}]
"""

VM = """
namespace: vm
workloadGroups:
  - name: vm-web
    labels: {app: vm-web}
    serviceAccount: vm-web
    template: {ports: {http: 8080}, labels: {version: v1, tier: template}}
    probe: {httpGet: {path: /healthz, port: 8080}}
services:
  - host: vm-web.vm.svc.cluster.local
    addresses: [0.0.0.0]
    ports: [{name: http, port: 8080}]
    workloadSelector: {app: vm-web}
"""

VM_NODE = {"AUTO_REGISTER_GROUP": "vm-web", "NETWORK": "net1"}


def mesh_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mesh"
    write(folder, "shop.yaml", SHOP)
    write(folder, "vm.yaml", VM)
    return folder


def test_name_table_per_namespace_versions_and_acks(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with devmesh(tmp_path, mesh_dir(tmp_path)) as mesh:
            shop = node("10.1.0.5", "cart-0", "shop")
            other = node("10.1.0.6", "web-0", "web", DNS_CAPTURE="false")
            async with connected(mesh, shop) as a, connected(mesh, other) as b:
                response, table = await a.subscribe_nds()
                assert response.version_info and response.nonce
                assert response.resources[0].type_url == NAME_TABLE
                assert table["cart.shop.svc.cluster.local"] == {
                    "ips": ["10.96.0.10"],
                    "registry": "Kubernetes",
                    "shortname": "cart",
                    "namespace": "shop",
                }
                assert table["secret.shop.svc.cluster.local"]["ips"] == ["10.96.0.11"]
                assert table["api.example.com"]["ips"][0].startswith("240.240.")
                assert table["api.example.com"]["registry"] == "External"
                assert "vm-web.vm.svc.cluster.local" not in table  # headless, no endpoints
                await a.no_response()  # the ACK is not answered

                _, other_table = await b.subscribe_nds()
                # exportTo "." hides secret; without DNS_CAPTURE no auto-allocated address
                assert set(other_table) == {"cart.shop.svc.cluster.local"}

                # Types devmesh has no resources for get an empty response with version and
                # nonce (LDS/CDS/EDS/RDS are served: tests/devmesh/test_devmesh_dataplane*.py).
                pcds = "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig"
                await a.send(discovery_pb2.DiscoveryRequest(type_url=pcds))
                other = await a.recv()
                assert other.type_url == pcds and not other.resources and other.nonce

                status, ndsz = await debug(mesh, "/debug/ndsz?proxy=cart-0")
                assert status == 200
                (entry,) = ndsz["proxies"]
                assert entry["proxy"] == shop.id
                assert "cart.shop.svc.cluster.local" in entry["nameTable"]["table"]
                assert entry["nds"]["ackedVersion"] == response.version_info
                status, _ = await debug(mesh, "/debug/ndsz?proxy=nobody")
                assert status == 404

    asyncio.run(scenario())


def test_config_change_pushes_and_bad_files_keep_the_old_config(tmp_path: Path) -> None:
    async def scenario() -> None:
        folder = mesh_dir(tmp_path)
        async with (
            devmesh(tmp_path, folder) as mesh,
            connected(mesh, node("10.1.0.5", "cart-0", "shop")) as client,
        ):
            await client.subscribe_nds()
            write(
                folder,
                "new.yaml",
                """
services:
  - {host: orders.shop.svc.cluster.local, namespace: shop, addresses: [10.96.0.30]}
""",
            )
            _, table = await client.table_push(timeout=3)
            assert table["orders.shop.svc.cluster.local"]["ips"] == ["10.96.0.30"]

            write(
                folder,
                "new.yaml",
                "services:\n  - {host: x.shop.svc.cluster.local, nmespace: shop}\n",
            )
            _, config = await eventually(lambda: _config_error(mesh), timeout=3)
            assert "new.yaml" in config["error"] and "nmespace" in config["error"]
            await client.no_response(0.5)  # the old config stays in force, nothing pushed

            (folder / "new.yaml").unlink()
            _, table = await client.table_push(timeout=3)
            assert "orders.shop.svc.cluster.local" not in table
            assert "cart.shop.svc.cluster.local" in table
            _, config = await debug(mesh, "/debug/config")
            assert config["error"] is None

    asyncio.run(scenario())


async def _config_error(mesh: object) -> tuple[int, dict[str, object]] | None:
    status, body = await debug(mesh, "/debug/config")  # type: ignore[arg-type]
    return (status, body) if body["error"] else None


def test_auto_registration_health_and_headless_dns(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with devmesh(tmp_path, mesh_dir(tmp_path)) as mesh:
            vm = node("10.2.0.7", "vm-1", "vm", {"app": "vm-web", "tier": "node"}, **VM_NODE)
            async with connected(mesh, node("10.1.0.5", "cart-0", "shop")) as watcher:
                _, table = await watcher.subscribe_nds()
                assert "vm-web.vm.svc.cluster.local" not in table
                async with connected(mesh, vm) as agent:
                    # Istio's agent: a health report before the first xDS request is ignored.
                    await agent.health(True)
                    await agent.subscribe_nds()
                    found = await eventually(lambda: entries(mesh))
                    entry = found["vm-web-10.2.0.7-net1"]
                    meta, spec = entry["metadata"], entry["spec"]
                    assert meta["namespace"] == "vm"
                    assert spec["address"] == "10.2.0.7"
                    assert spec["network"] == "net1"
                    assert spec["serviceAccount"] == "vm-web"
                    assert spec["ports"] == {"http": 8080}
                    # node LABELS > group labels > template labels
                    assert meta["labels"] == {"app": "vm-web", "version": "v1", "tier": "node"}
                    annotations = meta["annotations"]
                    assert annotations["istio.io/autoRegistrationGroup"] == "vm-web"
                    assert annotations["proxy.istio.io/health-checks-enabled"] == "true"
                    assert annotations["istio.io/connectedAt"].endswith("Z")
                    assert "istio.io/disconnectedAt" not in annotations
                    assert entry["status"] == {}  # the early report was ignored
                    assert entry["healthy"] is False  # health-checked, not yet reported

                    await agent.health(True)
                    _, table = await watcher.table_push()
                    assert table["vm-web.vm.svc.cluster.local"]["ips"] == ["10.2.0.7"]
                    (condition,) = (await entries(mesh))["vm-web-10.2.0.7-net1"]["status"][
                        "conditions"
                    ]
                    assert condition["type"] == "Healthy" and condition["status"] == "True"

                    await agent.health(False, "HTTP GET /healthz: 503")
                    _, table = await watcher.table_push()
                    assert "vm-web.vm.svc.cluster.local" not in table
                    (condition,) = (await entries(mesh))["vm-web-10.2.0.7-net1"]["status"][
                        "conditions"
                    ]
                    assert condition["status"] == "False"
                    assert condition["message"] == "HTTP GET /healthz: 503"

                    _, conns = await debug(mesh, "/debug/connections")
                    mine = [c for c in conns["connections"] if c["node"] == vm.id]
                    assert mine[0]["workloadEntry"] == "vm/vm-web-10.2.0.7-net1"
                    assert mine[0]["lastHealth"]["healthy"] is False

    asyncio.run(scenario())


def test_deleted_after_grace_but_kept_on_quick_reconnect(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with devmesh(tmp_path, mesh_dir(tmp_path), grace=1.0) as mesh:
            vm = node("fd00::7", "vm-1", "vm", {"app": "vm-web"}, AUTO_REGISTER_GROUP="vm-web")
            name = "vm-web-fd00--7"
            async with connected(mesh, vm) as agent:
                await agent.subscribe_nds()
                first = (await eventually(lambda: entries(mesh)))[name]
            # Disconnected: marked at once, kept during the grace period.
            found = await eventually(
                lambda: _with_annotation(mesh, name, "istio.io/disconnectedAt")
            )
            assert "istio.io/connectedAt" not in found["metadata"]["annotations"]
            async with connected(mesh, vm) as agent:  # reconnect within the grace period
                await agent.subscribe_nds()
                again = await eventually(
                    lambda: _with_annotation(mesh, name, "istio.io/connectedAt")
                )
                assert "istio.io/disconnectedAt" not in again["metadata"]["annotations"]
                assert (
                    again["metadata"]["annotations"]["istio.io/connectedAt"]
                    >= (first["metadata"]["annotations"]["istio.io/connectedAt"])
                )
                await asyncio.sleep(1.5)  # longer than the grace period: still there
                assert name in await entries(mesh)
            await eventually(lambda: _gone(mesh, name), timeout=5)

    asyncio.run(scenario())


async def _with_annotation(mesh: object, name: str, key: str) -> dict[str, object] | None:
    entry = (await entries(mesh)).get(name)  # type: ignore[arg-type]
    return entry if entry and key in entry["metadata"]["annotations"] else None


async def _gone(mesh: object, name: str) -> bool:
    return name not in await entries(mesh)  # type: ignore[arg-type]


def test_missing_group_is_failed_precondition_and_missing_node_invalid(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with devmesh(tmp_path, mesh_dir(tmp_path)) as mesh:
            lost = node("10.2.0.9", "vm-9", "vm", AUTO_REGISTER_GROUP="no-such-group")
            async with connected(mesh, lost) as agent:
                await agent.send(discovery_pb2.DiscoveryRequest(type_url=NAME_TABLE))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await agent.recv()
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "vm/no-such-group" in (caught.value.details() or "")
            assert await entries(mesh) == {}

            async with connected(mesh, node("10.2.0.9", "x", "vm")) as anonymous:
                anonymous.sent_node = True  # first request without a node
                await anonymous.send(discovery_pb2.DiscoveryRequest(type_url=NAME_TABLE))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await anonymous.recv()
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())


def test_nack_and_malformed_push_are_recorded(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            devmesh(tmp_path, mesh_dir(tmp_path)) as mesh,
            connected(mesh, node("10.1.0.5", "cart-0", "shop")) as client,
        ):
            good, _ = await client.subscribe_nds()
            status, body = await debug(
                mesh, "/debug/push-malformed?proxy=cart-0&kind=bytes", "POST"
            )
            assert status == 200 and len(body["pushed"]) == 1
            bad = await client.recv()
            assert bad.type_url == NAME_TABLE and bad.nonce != good.nonce
            with pytest.raises(Exception):  # noqa: B017 - the agent's decode failure
                bad.resources[0].Unpack(nds_pb2.NameTable())
                nds_pb2.NameTable.FromString(bad.resources[0].value)
            await client.nack(bad, "cannot decode NameTable")
            await client.no_response()  # a NACK is not answered

            _, conns = await debug(mesh, "/debug/connections")
            (conn,) = conns["connections"]
            nds = conn["watches"][NAME_TABLE]
            assert nds["nacks"][0]["message"] == "cannot decode NameTable"
            assert nds["nacks"][0]["code"] == 13
            assert nds["ackedVersion"] == good.version_info  # still the last good one

            status, body = await debug(mesh, "/debug/push-malformed?proxy=cart-0&kind=ips", "POST")
            assert status == 200
            bad = await client.recv()
            table = nds_pb2.NameTable()
            assert bad.resources[0].Unpack(table)
            assert list(table.table["malformed.devmesh.invalid"].ips) == ["not-an-ip", "300.1.2.3"]
            status, _ = await debug(mesh, "/debug/push-malformed?proxy=nobody", "POST")
            assert status == 404

    asyncio.run(scenario())


VM_WITHOUT_GROUP = """
namespace: vm
services:
  - host: vm-web.vm.svc.cluster.local
    addresses: [0.0.0.0]
    ports: [{name: http, port: 8080}]
    workloadSelector: {app: vm-web}
"""


def test_group_deleted_and_recreated_while_connected(tmp_path: Path) -> None:
    """istio/istio#45329: deleting the WorkloadGroup deletes its entries (ownerReference);
    creating it again brings the connected proxies' entries back within a second or two,
    with their last health report, without the agents reconnecting."""

    async def scenario() -> None:
        folder = mesh_dir(tmp_path)
        name = "vm-web-10.2.0.7-net1"
        async with devmesh(tmp_path, folder) as mesh:
            vm = node("10.2.0.7", "vm-1", "vm", {"app": "vm-web"}, **VM_NODE)
            quiet = node("10.2.0.8", "vm-2", "vm", {"app": "vm-web"}, **VM_NODE)
            async with connected(mesh, vm) as agent, connected(mesh, quiet) as other:
                await agent.subscribe_nds()
                await other.subscribe_nds()
                await agent.health(False, "HTTP GET /healthz: 503")
                await eventually(lambda: _condition(mesh, name))

                write(folder, "vm.yaml", VM_WITHOUT_GROUP)
                await eventually(lambda: _gone(mesh, name))
                assert await entries(mesh) == {}
                await agent.health(True)  # reported while the group is gone: kept

                write(folder, "vm.yaml", VM)
                loop = asyncio.get_running_loop()
                started = loop.time()
                back = await eventually(lambda: _condition(mesh, name), timeout=3)
                assert loop.time() - started < 2.0
                assert back["status"] == "True"
                found = await entries(mesh)
                assert found[name]["healthy"] is True
                assert "istio.io/connectedAt" in found[name]["metadata"]["annotations"]
                # A proxy that never reported is back too, not healthy (health-checked).
                assert found["vm-web-10.2.0.8-net1"]["healthy"] is False
                assert found["vm-web-10.2.0.8-net1"]["status"] == {}
                # The streams hold the restored entries: the headless service resolves to
                # the healthy VM again, and a later report updates the entry.
                for _ in range(5):  # pushes from the deletion may come first
                    _, table = await other.table_push()
                    if table.get("vm-web.vm.svc.cluster.local", {}).get("ips") == ["10.2.0.7"]:
                        break
                else:
                    raise AssertionError(f"the VM is not back in the NameTable: {table}")
                await agent.health(False, "HTTP GET /healthz: 500")
                await eventually(lambda: _condition(mesh, name, "False"))

    asyncio.run(scenario())


async def _condition(mesh: object, name: str, status: str | None = None) -> dict[str, str] | None:
    entry = (await entries(mesh)).get(name)  # type: ignore[arg-type]
    conditions = entry["status"].get("conditions") if entry else None
    if not conditions or (status is not None and conditions[0]["status"] != status):
        return None
    return conditions[0]  # type: ignore[no-any-return]
