"""The whole path with real parts: devmesh (the control plane ``vmagent devmesh serve`` runs:
CA + ADS over TLS, data plane built from its registry) <- the agent's one upstream stream
(token over TLS, auto-registration, health, NDS) <- the xDS proxy on ``xds.sock`` <- the real
Envoy with the agent's bootstrap, certificates from the agent's SDS on ``sds.sock``.

A request goes through Envoy with Istio mTLS to an app; then Envoy is killed (-9) and the mesh
changes while it is gone: DNS still gets the new name, devmesh still has the VM's one stream
and WorkloadEntry; the next Envoy serves the changed mesh, delta and SotW."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from devmesh.devmesh_envoy_helpers import StaticCerts, echo_app, http_get, workload_bundle
from devmesh.devmesh_xds_helpers import write
from loopback import free_port
from xds_proxy_helpers import Envoy, running_agent, short_dir, until

from vmagent.devmesh.controlplane import ControlPlaneSettings
from vmagent.devmesh.dataplane_model import DataplaneOptions
from vmagent.devmesh.serve import running_devmesh
from vmagent.devmesh.settings import DevCaSettings
from vmagent.health import HealthEvent as Health
from vmagent.identity.sds import SdsServer, sds_socket_path
from vmagent.xds.proxycore import DELTA, SOTW

pytestmark = pytest.mark.timeout(120)

IDENTITY = "spiffe://cluster.local/ns/vm/sa/web"
HOST = "web.vm.svc.cluster.local"
EXTRA = "extra.vm.svc.cluster.local"


def mesh_yaml(service_port: int, app_port: int, extra_port: int | None = None) -> str:
    text = f"""
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
    if extra_port is not None:
        text += f"""  - host: {EXTRA}
    addresses: [10.96.1.11]
    ports: [{{name: http, port: {extra_port}, protocol: HTTP}}]
    workloadSelector: {{app: web}}
"""
    return text


def through_envoy(port: int, host: str) -> Any:
    try:
        status, headers = http_get(port, host)
    except OSError:
        return None
    return headers if status == 200 else None


@pytest.mark.parametrize("kind", [DELTA, SOTW])
def test_envoy_restart_behind_one_devmesh_stream(kind: str) -> None:
    async def scenario(folder: Path, app_port: int) -> None:
        service_port, extra_port = free_port(), free_port()
        write(folder / "mesh", "mesh.yaml", mesh_yaml(service_port, app_port))
        ca = DevCaSettings(
            trust_domain="cluster.local", directory=str(folder / "keys"), listen="127.0.0.1:0"
        )
        settings = ControlPlaneSettings(
            config_dir=str(folder / "mesh"),
            poll_interval=0.1,
            debug_listen="",
            dataplane=DataplaneOptions(
                capture=False,
                listen_address="127.0.0.1",
                outbound_port=free_port(),
                inbound_port=free_port(),
            ),
        )
        async with running_devmesh(ca, settings) as mesh:
            state = mesh.control_plane.state
            token = mesh.ca.authority.mint_token("vm", "web", time.time())
            async with running_agent(
                folder,
                mesh.address,
                kind,
                token=token,
                hostname="web-0",
                XDS_ROOT_CA=str(mesh.root_cert),
                POD_NAMESPACE="vm",
                SERVICE_ACCOUNT="web",
                ISTIO_SVC_IP="127.0.0.1",
                ISTIO_META_AUTO_REGISTER_GROUP="web",
                ISTIO_META_CLUSTER_ID="Kubernetes",
            ) as agent:
                sds = SdsServer(
                    StaticCerts(workload_bundle(folder / "keys", IDENTITY)),
                    sds_socket_path(agent.config),
                )
                await sds.start()
                agent.client.report_health(Health(True))
                try:
                    first = Envoy(agent, folder / "envoy1.log", delta=kind == DELTA)
                    await first.start()
                    try:
                        headers = await wait_request(service_port, HOST, folder / "envoy1.log")
                        assert f"URI={IDENTITY}" in headers.get("x-forwarded-client-cert", "")
                    finally:
                        await first.kill()
                    (stream,) = state.sessions  # the agent's one stream
                    entries = state.registry_view()

                    # While Envoy is dead the mesh changes: DNS hears of it at once.
                    write(
                        folder / "mesh", "mesh.yaml", mesh_yaml(service_port, app_port, extra_port)
                    )
                    await until(
                        lambda: any(EXTRA in table for table in agent.tables), 15, "NDS push"
                    )

                    second = Envoy(agent, folder / "envoy2.log", delta=kind == DELTA)
                    await second.start()
                    try:
                        headers = await wait_request(extra_port, EXTRA, folder / "envoy2.log")
                        assert f"URI={IDENTITY}" in headers.get("x-forwarded-client-cert", "")
                        assert await wait_request(service_port, HOST, folder / "envoy2.log")
                    finally:
                        await second.kill()

                    assert list(state.sessions) == [stream]  # never a second stream
                    assert state.registry_view() == entries  # the WorkloadEntry never moved
                    (session,) = state.sessions.values()
                    assert {t: w.nacks for t, w in session.watches.items() if w.nacks} == {}
                    snapshot = agent.proxy.snapshot()
                    assert snapshot["downstreams"] == 2 and snapshot["replay_nacks"] == 0
                    assert (snapshot["replays"] > 0) == (kind == DELTA)
                finally:
                    await sds.stop()

    with short_dir() as folder, echo_app() as app_port:
        asyncio.run(scenario(folder, app_port))


async def wait_request(port: int, host: str, log: Path, timeout: float = 30) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        headers = await asyncio.to_thread(through_envoy, port, host)
        if headers:
            return headers
        await asyncio.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise AssertionError(f"no answer through Envoy on {port} ({host}); Envoy log:\n{tail}")
