"""The agent when the control plane goes away: devmesh killed and started again on the same
port and key directory (the agent reconnects, re-registers, re-sends its health), and devmesh
stopped for good (mesh names keep resolving from the persisted table, also after the agent
itself restarts)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from e2e_helpers import ENTRY, FAST, HttpApp, World, dig, wait_for

CART = "cart.shop.svc.cluster.local"
SHOP = [
    {
        "host": CART,
        "namespace": "shop",
        "addresses": ["10.96.7.7"],
        "ports": [{"name": "http", "port": 80, "protocol": "HTTP"}],
    }
]


@pytest.mark.timeout(60)
def test_devmesh_restart_reconnect_reregister_resend_health(world: World) -> None:
    app = HttpApp(200)
    try:
        probe = {"httpGet": {"path": "/", "port": app.port}, **FAST}
        mesh = world.devmesh(probe)
        agent = world.agent(mesh, probe)
        agent.start()
        agent.wait_ready()
        first = mesh.wait_health(True)
        assert agent.status()["xds"]["streams"] == 1

        mesh.kill()
        wait_for(lambda: not agent.status()["xds"]["connected"], 10, "the agent to notice")
        mesh.restart()
        # A fresh devmesh knows nothing: the entry comes back only through the agent, healthy
        # only because the agent re-sent its health on the new stream (the app did not change).
        again = mesh.wait_health(True, timeout=20)
        assert again["spec"] == first["spec"]
        assert again["metadata"]["labels"] == first["metadata"]["labels"]
        status = agent.status()
        assert status["xds"]["connected"] is True
        assert status["xds"]["streams"] == 2
        assert agent.ready()
        (connection,) = mesh.get("/debug/connections")["connections"]
        assert connection["workloadEntry"] == f"vm/{ENTRY}"
        assert connection["lastHealth"]["healthy"] is True
        # By now the agent has its workload cert and presents it on the stream (mTLS).
        assert connection["identity"] == "spiffe://cluster.local/ns/vm/sa/vm-web"

        # Health changes still flow over the new stream.
        app.code = 500
        mesh.wait_health(False)
        app.code = 200
        mesh.wait_health(True)
    finally:
        app.close()


def _persisted(agent_state: Any) -> dict[str, Any]:
    table: dict[str, Any] = json.loads((agent_state / "nametable.json").read_text())
    return table


@pytest.mark.timeout(60)
def test_names_resolve_from_persisted_table_while_devmesh_is_down(world: World) -> None:
    mesh = world.devmesh(services=SHOP)
    agent = world.agent(mesh)
    agent.start()
    agent.wait_ready()
    assert dig(agent.dns, CART) == ("NOERROR", ["10.96.7.7"])
    wait_for(lambda: CART in _persisted(agent.state_dir).get("table", {}), 5, "the table on disk")

    mesh.stop()
    wait_for(lambda: not agent.status()["xds"]["connected"], 10, "the agent to notice")
    assert dig(agent.dns, CART) == ("NOERROR", ["10.96.7.7"])
    assert dig(agent.dns, "web.vm.svc.cluster.local") == ("NOERROR", ["10.96.1.10"])

    # The agent restarts while the control plane is still down: it answers from the file.
    assert agent.proc is not None
    assert agent.proc.terminate() == 0
    agent.start()
    wait_for(lambda: agent.status()["dns"]["ready"], 10, "the restarted agent's DNS proxy")
    assert dig(agent.dns, CART) == ("NOERROR", ["10.96.7.7"])
    assert dig(agent.dns, "cart.shop") == ("NOERROR", ["10.96.7.7"])
    assert dig(agent.dns, "web.vm.svc.cluster.local") == ("NOERROR", ["10.96.1.10"])
    assert dig(agent.dns, "up.e2e.test")[0] == "NOERROR"  # upstream still forwarded
    status = agent.status()
    assert status["xds"]["connected_once"] is False
    assert "control plane not connected yet" in status["not_ready"]
    assert not agent.ready()

    # The control plane comes back with a changed mesh: the new table replaces the file's.
    (world.config_dir / "vm.yaml").write_text(
        (world.config_dir / "vm.yaml").read_text().replace("10.96.7.7", "10.96.7.8")
    )
    mesh.restart()
    agent.wait_ready(timeout=20)
    wait_for(lambda: dig(agent.dns, CART) == ("NOERROR", ["10.96.7.8"]), 5, f"{CART} updated")
    wait_for(
        lambda: _persisted(agent.state_dir)["table"][CART]["ips"] == ["10.96.7.8"],
        5,
        "the new table on disk",
    )
