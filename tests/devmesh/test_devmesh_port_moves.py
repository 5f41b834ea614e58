"""The WorkloadGroup template port reaches connected proxies' WorkloadEntries on a config
reload, and ``vmagent dev --app-port`` moves the group's workload port (pure cores)."""

from __future__ import annotations

from pathlib import Path

from vmagent.devmesh.dataplane_model import PortMove, inbound_ports, move_group_ports
from vmagent.devmesh.services import MeshConfig, load_directory
from vmagent.devmesh.state import MeshState

from .test_devmesh_cores import proxy

MESH = """\
namespace: vm
workloadGroups:
  - name: web
    labels: {app: web}
    template: {ports: {http: PORT}}
services:
  - host: web.vm.svc.cluster.local
    addresses: [10.96.1.10]
    ports: [{name: http, port: 8080, protocol: HTTP}, {name: grpc, port: 9090, protocol: GRPC}]
    workloadSelector: {app: web}
"""


def mesh(tmp_path: Path, port: int) -> MeshConfig:
    (tmp_path / "mesh.yaml").write_text(MESH.replace("PORT", str(port)))
    return load_directory(tmp_path)


def test_template_port_edit_reaches_the_connected_entry(tmp_path: Path) -> None:
    state = MeshState(mesh(tmp_path, 8080))
    node = proxy("vm", "10.0.0.5", AUTO_REGISTER_GROUP="web")
    entry = state.registry.connect("s1", node, state.config, 1.0)
    assert entry is not None and dict(entry.ports) == {"http": 8080}
    deleted, back, refreshed = state.set_config(mesh(tmp_path, 28080), 2.0)
    assert (deleted, back) == ([], [])
    assert [dict(e.ports) for e in refreshed] == [{"http": 28080}]
    now = state.registry.entry_of("s1")
    assert now is not None and dict(now.ports) == {"http": 28080}
    assert now.annotations == entry.annotations  # the same registration, not a new one
    assert [p.cluster for p in inbound_ports(state.config, now)] == [
        "inbound|9090||",
        "inbound|28080||",
    ]
    assert state.set_config(mesh(tmp_path, 28080), 3.0)[2] == []  # nothing changed


def test_app_port_move_follows_the_template_and_unnamed_service_ports(tmp_path: Path) -> None:
    config = mesh(tmp_path, 8080)
    moved = move_group_ports(config, [PortMove("vm", "web", 8080, 28080)])
    group = moved.group("vm", "web")
    assert group is not None and dict(group.ports) == {"http": 28080}
    # No template port for "grpc": it defaults to the service port 9090; a move of 9090 adds it.
    moved = move_group_ports(config, [PortMove("vm", "web", 9090, 29090)])
    group = moved.group("vm", "web")
    assert group is not None and dict(group.ports) == {"http": 8080, "grpc": 29090}
    assert move_group_ports(config, [PortMove("vm", "other", 8080, 1)]) == config
