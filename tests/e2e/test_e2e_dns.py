"""The mesh's services in the agent's DNS proxy, end to end: a service written into devmesh's
config directory answers at the agent's DNS port (real ``dig``) within about a second; a
removed one falls through to the upstream (dnsmasq: NXDOMAIN)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from e2e_helpers import UPSTREAM_IP, World, dig, mesh_config, wait_for, write_yaml

CART = "cart.shop.svc.cluster.local"
CART_VIP = "10.96.7.7"
PARTNER = {
    "namespace": "egress",
    "services": [
        {
            "host": "*.partner.example.com",
            "registry": "External",
            "addresses": ["10.200.0.10"],
            "ports": [{"name": "https", "port": 443, "protocol": "TLS"}],
        }
    ],
}


@pytest.mark.timeout(60)
def test_service_added_and_removed_in_config_dir(world: World) -> None:
    mesh = world.devmesh()
    agent = world.agent(mesh)
    agent.start()
    agent.wait_ready()

    assert dig(agent.dns, "web.vm.svc.cluster.local") == ("NOERROR", ["10.96.1.10"])
    # Not a mesh name (yet): forwarded to dnsmasq, which knows nothing about it.
    assert dig(agent.dns, CART) == ("NXDOMAIN", [])
    assert dig(agent.dns, "up.e2e.test") == ("NOERROR", [UPSTREAM_IP])

    shop: dict[str, Any] = {
        "namespace": "shop",
        "services": [
            {
                "host": CART,
                "addresses": [CART_VIP],
                "ports": [{"name": "http", "port": 80, "protocol": "HTTP"}],
            }
        ],
    }
    write_yaml(world.config_dir / "shop.yaml", shop)
    write_yaml(world.config_dir / "partner.yaml", PARTNER)
    written = time.monotonic()
    # devmesh polls every 100 ms here; "within ~1 s" is checked with a generous bound.
    wait_for(lambda: dig(agent.dns, CART) == ("NOERROR", [CART_VIP]), 5, f"{CART} answered")
    took = time.monotonic() - written
    assert dig(agent.dns, "anything.partner.example.com") == ("NOERROR", ["10.200.0.10"])
    assert dig(agent.dns, "x.y.partner.example.com") == ("NOERROR", ["10.200.0.10"])
    assert took < 5

    # A changed address follows too.
    shop["services"][0]["addresses"] = ["10.96.7.8"]
    write_yaml(world.config_dir / "shop.yaml", shop)
    wait_for(lambda: dig(agent.dns, CART) == ("NOERROR", ["10.96.7.8"]), 5, f"{CART} moved")

    # Removed: the name is no longer the mesh's; dnsmasq answers NXDOMAIN.
    (world.config_dir / "shop.yaml").unlink()
    wait_for(lambda: dig(agent.dns, CART)[0] == "NXDOMAIN", 5, f"{CART} gone")
    assert dig(agent.dns, CART) == ("NXDOMAIN", [])
    # Removing a service from a file (not the whole file) works the same.
    write_yaml(world.config_dir / "vm.yaml", mesh_config())
    write_yaml(world.config_dir / "partner.yaml", {"namespace": "egress", "services": []})
    wait_for(
        lambda: dig(agent.dns, "anything.partner.example.com")[0] == "NXDOMAIN",
        5,
        "the wildcard gone",
    )
    # The rest of the table is untouched and the agent saw each change as a push.
    assert dig(agent.dns, "web.vm.svc.cluster.local") == ("NOERROR", ["10.96.1.10"])
    status = agent.status()
    assert status["xds"]["name_table_updates"] >= 4
    assert status["xds"]["nacks"] == 0


@pytest.mark.timeout(60)
def test_invalid_config_change_keeps_answering(world: World) -> None:
    """A bad file in devmesh's directory is refused there; the agent keeps the last table."""
    mesh = world.devmesh()
    agent = world.agent(mesh)
    agent.start()
    agent.wait_ready()
    write_yaml(world.config_dir / "partner.yaml", PARTNER)
    wait_for(
        lambda: dig(agent.dns, "a.partner.example.com") == ("NOERROR", ["10.200.0.10"]),
        5,
        "the wildcard answered",
    )
    (world.config_dir / "broken.yaml").write_text("services: [{host: 42, adresses: nope}]\n")
    error = wait_for(lambda: mesh.get("/debug/config").get("error"), 5, "devmesh reload error")
    assert "broken.yaml" in str(error)
    assert dig(agent.dns, "a.partner.example.com") == ("NOERROR", ["10.200.0.10"])
    assert dig(agent.dns, "web.vm.svc.cluster.local") == ("NOERROR", ["10.96.1.10"])
