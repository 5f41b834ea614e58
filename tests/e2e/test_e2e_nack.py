"""A malformed NameTable push (devmesh's test hook) is NACKed by the agent, recorded on both
sides, and the old table keeps answering; the next real change is applied normally."""

from __future__ import annotations

from typing import Any

import pytest
from e2e_helpers import NAMESPACE, VM_IP, World, dig, http_json, wait_for, write_yaml

CART = "cart.shop.svc.cluster.local"
SHOP = [
    {
        "host": CART,
        "namespace": "shop",
        "addresses": ["10.96.7.7"],
        "ports": [{"name": "http", "port": 80, "protocol": "HTTP"}],
    }
]


def _nds(mesh: Any) -> dict[str, Any]:
    (proxy,) = mesh.get(f"/debug/ndsz?proxy={VM_IP}")["proxies"]
    nds: dict[str, Any] = proxy["nds"]
    return nds


@pytest.mark.timeout(60)
def test_malformed_name_table_is_nacked_and_old_table_kept(world: World) -> None:
    mesh = world.devmesh(services=SHOP)
    agent = world.agent(mesh)
    agent.start()
    agent.wait_ready()
    assert dig(agent.dns, CART) == ("NOERROR", ["10.96.7.7"])
    good = agent.status()["xds"]["name_table_version"]
    assert good and _nds(mesh)["ackedVersion"] == good

    for count, kind in enumerate(("bytes", "ips"), 1):
        status, body = http_json(
            f"{mesh.debug_url}/debug/push-malformed?proxy={VM_IP}&kind={kind}", "POST"
        )
        assert status == 200 and body["kind"] == kind, body

        xds = wait_for(
            lambda n=count: (x := agent.status()["xds"])["nacks"] == n and x,  # type: ignore[misc]
            5,
            f"NACK #{count} ({kind}) in the agent's /status",
        )
        assert xds["last_nack"], xds
        assert xds["name_table_version"] == good  # still the last accepted table
        nacks = wait_for(
            lambda n=count: len(ns := _nds(mesh)["nacks"]) == n and ns,  # type: ignore[misc]
            5,
            f"devmesh to record NACK #{count}",
        )
        nack = nacks[-1]
        assert nack["code"] == 13, nack  # INTERNAL, as Istio's agent
        assert nack["message"] == xds["last_nack"]
        # A NACK carries the last accepted version and the rejected push's nonce.
        nds = _nds(mesh)
        assert nack["version"] == good == nds["ackedVersion"]
        assert nack["nonce"] == nds["sentNonce"] != nds["ackedNonce"]
        # The old table still answers; the malformed one never does.
        assert dig(agent.dns, CART) == ("NOERROR", ["10.96.7.7"])
        assert dig(agent.dns, "web.vm.svc.cluster.local") == ("NOERROR", ["10.96.1.10"])
        assert dig(agent.dns, "malformed.devmesh.invalid")[1] == []
        # And the agent still serves and persists the good table.
        assert CART in http_json(agent.status_url + "/debug/ndsz")[1]["table"]

    (connection,) = mesh.get("/debug/connections")["connections"]
    recorded = connection["watches"]["type.googleapis.com/istio.networking.nds.v1.NameTable"]
    assert len(recorded["nacks"]) == 2
    assert connection["namespace"] == NAMESPACE

    # The stream is still healthy: the next real change is pushed, accepted and answered.
    moved = {k: v for k, v in SHOP[0].items() if k != "namespace"}
    shop = {"namespace": "shop", "services": [{**moved, "addresses": ["10.96.7.9"]}]}
    write_yaml(world.config_dir / "shop.yaml", shop)
    (world.config_dir / "vm.yaml").write_text(
        (world.config_dir / "vm.yaml").read_text().replace(CART, "old-cart.shop.svc.cluster.local")
    )
    wait_for(lambda: dig(agent.dns, CART) == ("NOERROR", ["10.96.7.9"]), 5, f"{CART} updated")
    # The DNS proxy swaps the table in before the xDS status records its version (seen in CI).
    wait_for(
        lambda: agent.status()["xds"]["name_table_version"] != good, 5, "the new version in /status"
    )
    xds = agent.status()["xds"]
    assert xds["nacks"] == 2
    assert xds["name_table_version"] != good
    wait_for(lambda: _nds(mesh)["ackedVersion"] == xds["name_table_version"], 5, "the ACK")
