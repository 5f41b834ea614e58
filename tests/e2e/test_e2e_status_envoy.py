"""``vmagent status`` and ``/stats/prometheus`` with a real Envoy under the agent (in a network
namespace of the test's own: Envoy's listeners use fixed ports): Envoy's section, and Envoy's
admin stats merged after the agent's, all parsed by Prometheus's own text parser."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import World, http_get, netns_skip_reason, own_network_namespace
from loopback import free_port
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def nsworld(tmp_path: Path) -> Iterator[World]:
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    with own_network_namespace():
        env = World(tmp_path)
        try:
            yield env
        finally:
            env.close()
            print(env.procs.logs())


def test_status_and_metrics_with_envoy(nsworld: World) -> None:
    mesh = nsworld.devmesh()
    agent = nsworld.agent(
        mesh,
        VMAGENT_ENVOY="true",
        VMAGENT_ENVOY_READINESS_PORT=str(free_port()),
        VMAGENT_ENVOY_PROMETHEUS_PORT=str(free_port()),
    )
    agent.proxy_config = {"proxyAdminPort": free_port(), "terminationDrainDuration": "1s"}
    agent.start()
    agent.wait_ready(timeout=40)

    done = subprocess.run(
        [sys.executable, "-m", "vmagent", "status", "--json"],
        env=agent.env(), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done
    envoy = json.loads(done.stdout)["envoy"]
    assert envoy["live"] is True and envoy["state"] == "live", envoy
    assert envoy["pid"] > 0 and envoy["rss_bytes"] > 0 and envoy["restarts"] == 0
    text = subprocess.run(
        [sys.executable, "-m", "vmagent", "status"],
        env=agent.env(), capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip
    assert f"pid:                 {envoy['pid']}" in text and "LIVE: yes" in text, text

    code, body = http_get(agent.status_url + "/stats/prometheus")
    assert code == 200
    names = {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert names["vmagent_envoy_live"] == 1 and names["vmagent_envoy_restarts_total"] == 0
    assert names["vmagent_envoy_resident_memory_bytes"] > 0
    assert any(name.startswith("envoy_server_") for name in names), sorted(names)[:20]
    assert body.index("vmagent_ready") < body.index("envoy_server_")  # Istio's order
