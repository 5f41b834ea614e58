"""``vmagent status`` and ``/stats/prometheus`` end to end: ``vmagent run`` as a process
against ``vmagent devmesh serve``, asked by ``vmagent status`` as a process (over the Unix
socket and over TCP), its exit statuses (0 healthy, 1 probe failing, 3 stopped, 4 socket not
accessible), the ``--json`` schema (docs/status.md) and the metrics read by Prometheus's own
text parser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import ENTRY, FAST, HttpApp, World, clean_env, http_get, wait_for
from prometheus_client.parser import text_string_to_metric_families

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


def status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmagent", "status", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def check_schema(value: Any, path: str = "") -> None:
    """Every key snake_case (except the free-form maps named below), every time RFC 3339."""
    if isinstance(value, dict):
        free = path.endswith((".queries", ".buckets", ".parts"))
        for key, item in value.items():
            assert free or SNAKE.match(key), f"{path}.{key}: not snake_case"
            if key.endswith(("_at", "_since", "_after")) and item is not None:
                assert isinstance(item, str) and RFC3339.match(item), f"{path}.{key}: {item!r}"
            check_schema(item, f"{path}.{key}")
    elif isinstance(value, list):
        for item in value:
            check_schema(item, path)


@pytest.mark.timeout(90)
def test_status_exit_codes_sections_json_and_metrics(world: World) -> None:
    app = HttpApp(200)
    try:
        probe = {"httpGet": {"path": "/healthz", "port": app.port}, **FAST}
        mesh = world.devmesh(probe)
        agent = world.agent(mesh, probe)
        env = agent.env()
        # Before the agent runs: "not running", exit 3, for the socket and the TCP endpoint.
        stopped = status(env)
        assert stopped.returncode == 3, stopped
        assert "not running" in stopped.stderr and "status.sock" in stopped.stderr
        assert status(env, "--addr", agent.status_url.removeprefix("http://")).returncode == 3

        agent.start()
        agent.wait_ready()
        mesh.wait_health(True)
        assert agent.resolve("web.vm.svc.cluster.local") == ["10.96.1.10"]
        assert agent.resolve("up.e2e.test") == ["192.0.2.53"]
        assert agent.resolve("up.e2e.test") == ["192.0.2.53"]  # from the cache

        healthy = wait_for(
            lambda: (r := status(env)).returncode == 0 and r, 15, "vmagent status exit 0"
        )
        text = healthy.stdout
        for section in ("HEALTHY", "Identity", "Control plane", "Envoy", "DNS", "No problems."):
            assert section in text, text
        assert "spiffe://cluster.local/ns/vm/sa/vm-web" in text
        assert ENTRY in text  # the WorkloadEntry name
        assert mesh.address in text
        assert agent.dns in text  # listen address

        answer = status(env, "--json")
        assert answer.returncode == 0, answer
        import json

        view = json.loads(answer.stdout)
        check_schema(view)
        assert view["schema_version"] == 1 and view["state"] == "healthy"
        assert view["problems"] == []
        assert view["identity"]["spiffe_id"] == "spiffe://cluster.local/ns/vm/sa/vm-web"
        assert view["control_plane"]["workload_entry"] == ENTRY
        assert view["control_plane"]["reported_health"] == {"healthy": True, "message": ""}
        assert view["health"]["state"] == "healthy"
        assert view["dns"]["table"]["names"] > 0
        assert view["dns"]["queries"]["table"] >= 1 and view["dns"]["queries"]["cache"] >= 1
        assert 0 < view["dns"]["cache_hit_ratio"] <= 1
        assert view["envoy"] is None  # VMAGENT_ENVOY=false
        # TCP gives the same document.
        tcp = status(env, "--json", "--addr", agent.status_url.removeprefix("http://"))
        assert tcp.returncode == 0 and json.loads(tcp.stdout)["node"] == view["node"]

        # Metrics, parsed by Prometheus's own parser.
        code, body = http_get(agent.status_url + "/stats/prometheus")
        assert code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        assert samples[("vmagent_dns_queries_total", (("outcome", "table"),))] >= 1
        assert samples[("vmagent_dns_queries_total", (("outcome", "cache"),))] >= 1
        assert samples[("vmagent_dns_upstream_latency_seconds_count", ())] >= 1
        assert samples[("vmagent_dns_upstream_latency_seconds_bucket", (("le", "+Inf"),))] >= 1
        assert samples[("vmagent_dns_table_names", ())] > 0
        assert 0 <= samples[("vmagent_dns_table_age_seconds", ())] < 300
        assert samples[("vmagent_dns_cache_entries", ())] >= 1
        expiry = samples[("vmagent_cert_expiry_timestamp_seconds", ())]
        assert time.time() < expiry < time.time() + 400 * 86400
        assert samples[("vmagent_xds_connected", ())] == 1
        assert samples[("vmagent_xds_pushes_total", ())] >= 1
        assert samples[("vmagent_health_healthy", ())] == 1
        assert samples[("vmagent_ready", ())] == 1

        # The probe fails: degraded, exit 1, and the part is named.
        app.code = 503
        mesh.wait_health(False)
        degraded = wait_for(
            lambda: (r := status(env)).returncode == 1 and r, 15, "vmagent status exit 1"
        )
        assert "DEGRADED" in degraded.stdout and "readiness probe fails" in degraded.stdout
        assert "what to do:" in degraded.stdout
        assert "health" in degraded.stderr, degraded.stderr

        # --watch is bounded by --count and measures the query rate between rounds.
        watched = status(env, "--watch", "0.2", "--count", "2")
        assert watched.returncode == 1
        assert watched.stdout.count("Identity") == 2 and "/s\n" in watched.stdout

        # Stopped: exit 3 again.
        assert agent.proc is not None
        assert agent.proc.terminate() == 0
        gone = status(env)
        assert gone.returncode == 3 and "not running" in gone.stderr, gone
    finally:
        app.close()


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the client as another user")
def test_status_socket_not_accessible_says_what_to_do(world: World) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    # Outside pytest's 0700 tree, so that another user can reach the socket's directory.
    shared = Path(tempfile.mkdtemp(prefix="vmagent-status-"))
    try:
        shared.chmod(0o755)
        run_dir, config_dir = shared / "run", shared / "etc"
        config_dir.mkdir(mode=0o755)
        mesh = world.devmesh()
        agent = world.agent(mesh, VMAGENT_RUN_DIR=str(run_dir))
        agent.start()
        agent.wait_ready()
        assert (run_dir / "status.sock").exists()
        run_dir.chmod(0o755)
        env = clean_env(
            VMAGENT_RUN_DIR=str(run_dir),
            VMAGENT_CONFIG_DIR=str(config_dir),
            VMAGENT_CLUSTER_ENV=os.devnull,
            VMAGENT_MESH_CONFIG=os.devnull,
        )
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
        denied = subprocess.run(
            [*argv, "-m", "vmagent", "status"], env=env, capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        assert denied.returncode == 4, denied.stderr
        assert "permission denied" in denied.stderr
        assert "run as root" in denied.stderr and "group vmagent" in denied.stderr
        assert "Traceback" not in denied.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)
