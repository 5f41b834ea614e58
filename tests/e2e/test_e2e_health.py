"""Auto-registration and health, end to end: ``vmagent run`` registers the VM into devmesh's
WorkloadGroup and its readiness probe of a real app (HTTP, TCP, exec, gRPC) drives the
WorkloadEntry's health in devmesh's ``/debug/registry``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from e2e_helpers import (
    ENTRY,
    FAST,
    GROUP,
    GROUP_LABELS,
    NAMESPACE,
    SERVICE_ACCOUNT,
    TEMPLATE_LABELS,
    VM_IP,
    GrpcHealthApp,
    HttpApp,
    TcpPort,
    World,
    exec_probe_script,
    wait_for,
    write_yaml,
)


def _condition(entry: dict[str, Any]) -> dict[str, Any]:
    conditions = [c for c in entry["status"]["conditions"] if c["type"] == "Healthy"]
    assert len(conditions) == 1, entry
    condition: dict[str, Any] = conditions[0]
    return condition


@pytest.mark.timeout(60)
def test_entry_registered_and_health_follows_http_app(world: World) -> None:
    app = HttpApp(200)
    try:
        probe = {"httpGet": {"path": "/healthz", "port": app.port}, **FAST}
        headless = {
            "host": "web-direct.vm.svc.cluster.local",
            "addresses": ["0.0.0.0"],
            "ports": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
            "workloadSelector": GROUP_LABELS,
        }
        mesh = world.devmesh(probe, services=[headless])
        agent = world.agent(mesh, probe)
        agent.start()
        agent.wait_ready()

        entry = mesh.wait_health(True)
        # Name <group>-<ip>, address, labels (template < group < node), SA, ports, ownership.
        assert entry["metadata"]["name"] == f"{GROUP}-{VM_IP}" == ENTRY
        assert entry["metadata"]["namespace"] == NAMESPACE
        assert entry["spec"]["address"] == VM_IP
        labels = {**TEMPLATE_LABELS, **GROUP_LABELS, "node-label": "from-vm"}
        assert entry["metadata"]["labels"] == labels
        assert entry["spec"]["labels"] == labels
        assert entry["spec"]["serviceAccount"] == SERVICE_ACCOUNT
        assert entry["spec"]["ports"] == {"http": 8080}
        annotations = entry["metadata"]["annotations"]
        assert annotations["istio.io/autoRegistrationGroup"] == GROUP
        assert annotations["proxy.istio.io/health-checks-enabled"] == "true"
        assert "istio.io/connectedAt" in annotations
        assert "istio.io/disconnectedAt" not in annotations
        assert _condition(entry)["status"] == "True"
        # A healthy registered VM is an endpoint of the headless service selecting it.
        agent.wait_resolves("web-direct.vm.svc.cluster.local", [VM_IP])

        app.code = 503
        entry = mesh.wait_health(False)
        condition = _condition(entry)
        assert condition["status"] == "False"
        assert "503" in condition["message"], condition
        wait_for(
            lambda: agent.status()["health"]["state"] == "unhealthy", 5, "agent health unhealthy"
        )
        agent.wait_resolves("web-direct.vm.svc.cluster.local", [])

        app.code = 200
        entry = mesh.wait_health(True)
        assert _condition(entry)["status"] == "True"
        assert agent.status()["xds"]["health"]["healthy"] is True
        agent.wait_resolves("web-direct.vm.svc.cluster.local", [VM_IP])
    finally:
        app.close()


@pytest.mark.timeout(60)
def test_health_follows_tcp_port(world: World) -> None:
    port = TcpPort()
    try:
        probe = {"tcpSocket": {"port": port.port}, **FAST}
        mesh = world.devmesh(probe)
        agent = world.agent(mesh, probe)
        agent.start()
        agent.wait_ready()

        entry = mesh.wait_health(False)  # nothing listens yet
        assert str(port.port) in _condition(entry)["message"]

        port.open()
        mesh.wait_health(True)
        port.close()
        mesh.wait_health(False)
        port.open()
        mesh.wait_health(True)
    finally:
        port.close()


@pytest.mark.timeout(60)
def test_health_follows_exec_script_from_mesh_yaml(world: World) -> None:
    """The probe comes from mesh.yaml's defaultConfig (as istioctl writes it), not
    PROXY_CONFIG; the script's exit code is controlled by a file."""
    script, control = exec_probe_script(world.tmp)
    probe = {"exec": {"command": [str(script)]}, **FAST}
    mesh = world.devmesh(probe)
    mesh_yaml = world.tmp / "mesh.yaml"
    write_yaml(mesh_yaml, {"defaultConfig": {"readinessProbe": probe}})
    agent = world.agent(mesh, None, VMAGENT_MESH_CONFIG=str(mesh_yaml))
    agent.start()
    agent.wait_ready()

    mesh.wait_health(True)
    control.write_text("1\n")
    entry = mesh.wait_health(False)
    assert _condition(entry)["status"] == "False"
    control.write_text("0\n")
    mesh.wait_health(True)
    # The node carries the probe from mesh.yaml in its PROXY_CONFIG metadata.
    (connection,) = mesh.get("/debug/connections")["connections"]
    sent = connection["metadata"]["PROXY_CONFIG"]["readinessProbe"]["exec"]["command"]
    assert sent == [str(script)]


@pytest.mark.timeout(60)
def test_health_follows_grpc_health_server(world: World) -> None:
    app = GrpcHealthApp(service="vm.web")
    try:
        app.set_serving(False)
        probe = {"grpc": {"port": app.port, "service": "vm.web"}, **FAST}
        mesh = world.devmesh(probe)
        agent = world.agent(mesh, probe)
        agent.start()
        agent.wait_ready()

        entry = mesh.wait_health(False)
        assert "NOT_SERVING" in _condition(entry)["message"], json.dumps(entry)
        app.set_serving(True)
        mesh.wait_health(True)
        app.set_serving(False)
        mesh.wait_health(False)
        app.set_serving(True)
        mesh.wait_health(True)
    finally:
        app.close()
