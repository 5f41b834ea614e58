"""``/stats/prometheus``: the agent's counters as ``vmagent_*`` metrics, read back by
Prometheus's own text parser, with Envoy's admin stats merged after them (as Istio's agent)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_status_view import NOW, raw_state

from vmagent.envoy.admin import AdminClient
from vmagent.status.metric_families import families
from vmagent.status.metrics import AgentMetrics

ENVOY_TEXT = (
    "# TYPE envoy_server_live gauge\n"
    "envoy_server_live{} 1\n"
    "# TYPE envoy_cluster_upstream_cx_total counter\n"
    'envoy_cluster_upstream_cx_total{cluster_name="xds-grpc"} 3\n'
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_agent_metrics_parse_with_sane_values() -> None:
    envoy = {"restarts": 2, "live": True, "process": {"rss_bytes": 1000}}
    doc = raw_state(envoy=envoy)
    metrics = AgentMetrics(lambda: doc, clock=lambda: NOW)
    got = samples(metrics.agent_text().decode())
    assert got[("vmagent_dns_queries_total", (("outcome", "cache"),))] == 30
    assert got[("vmagent_dns_upstream_latency_seconds_bucket", (("le", "0.001"),))] == 4
    assert got[("vmagent_dns_upstream_latency_seconds_bucket", (("le", "+Inf"),))] == 10
    assert got[("vmagent_dns_upstream_latency_seconds_count", ())] == 10
    assert got[("vmagent_dns_upstream_latency_seconds_sum", ())] == 0.5
    assert got[("vmagent_dns_cache_entries", ())] == 7
    assert got[("vmagent_dns_table_names", ())] == 4
    assert got[("vmagent_dns_table_age_seconds", ())] == 60
    assert got[("vmagent_cert_expiry_timestamp_seconds", ())] == NOW + 86400
    assert got[("vmagent_xds_connected", ())] == 1
    assert got[("vmagent_xds_pushes_total", ())] == 3
    assert got[("vmagent_health_healthy", ())] == 1
    assert got[("vmagent_envoy_restarts_total", ())] == 2
    assert got[("vmagent_build_info", (("version", "0.1.0"),))] == 1
    assert all(name.startswith("vmagent_") for name, _ in got)


def test_two_agents_have_registries_of_their_own() -> None:
    one = AgentMetrics(lambda: raw_state(), clock=lambda: NOW)
    two = AgentMetrics(lambda: raw_state(envoy=None, health=None), clock=lambda: NOW)
    assert ("vmagent_health_healthy", ()) in samples(one.agent_text().decode())
    assert ("vmagent_health_healthy", ()) not in samples(two.agent_text().decode())


@pytest.fixture
def envoy_admin() -> Iterator[tuple[AdminClient, list[int]]]:
    """A real HTTP server answering ``/stats/prometheus`` as Envoy's admin does; the list
    holds the status code to answer with."""
    code = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = ENVOY_TEXT.encode() if self.path == "/stats/prometheus" else b""
            self.send_response(code[0])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield AdminClient("127.0.0.1", int(server.server_address[1])), code
    finally:
        server.shutdown()
        server.server_close()


def test_envoy_stats_merged_after_the_agents_and_skipped_when_envoy_fails(
    envoy_admin: tuple[AdminClient, list[int]],
) -> None:
    admin, code = envoy_admin
    metrics = AgentMetrics(lambda: raw_state(), lambda: admin, clock=lambda: NOW)
    text = asyncio.run(metrics.render()).decode()
    assert text.index("vmagent_ready") < text.index("envoy_server_live")  # Istio's order
    got = samples(text)
    assert got[("envoy_cluster_upstream_cx_total", (("cluster_name", "xds-grpc"),))] == 3
    assert got[("vmagent_xds_connected", ())] == 1
    code[0] = 503  # Envoy's admin fails: the agent's metrics are still served
    got = samples(asyncio.run(metrics.render()).decode())
    assert ("envoy_server_live", ()) not in got and ("vmagent_ready", ()) in got


def test_prometheus_client_loads_only_at_the_first_scrape() -> None:
    """~4.5 MB of RSS an agent nobody scrapes does not pay (issue 7 §5)."""
    code = (
        "import sys, vmagent.agent\n"
        "before = 'prometheus_client' in sys.modules\n"
        "from vmagent.status.metrics import AgentMetrics\n"
        "AgentMetrics(lambda: {}).agent_text()\n"
        "print(before, 'prometheus_client' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out == ["False", "True"]


def test_families_without_any_part_yet() -> None:
    names = {family.name for family in families({}, NOW)}
    assert {"vmagent_ready", "vmagent_xds_connected", "vmagent_dns_queries"} <= names
