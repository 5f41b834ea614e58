"""SIGTERM: the agent reports itself unhealthy before it closes the stream (traffic drains
before the WorkloadEntry goes), then exits 0; devmesh deletes the entry after its grace."""

from __future__ import annotations

import signal
from datetime import datetime
from typing import Any

import pytest
from e2e_helpers import FAST, HttpApp, World, wait_for


def _time(text: str) -> datetime:
    """RFC 3339 with up to nanoseconds (Python parses microseconds)."""
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6].ljust(6, '0')}+00:00")


@pytest.mark.timeout(60)
def test_sigterm_reports_unhealthy_before_disconnecting_and_exits_0(world: World) -> None:
    app = HttpApp(200)
    try:
        probe = {"httpGet": {"path": "/", "port": app.port}, **FAST}
        mesh = world.devmesh(probe, grace="3s")
        agent = world.agent(mesh, probe)
        proc = agent.start()
        agent.wait_ready()
        healthy = mesh.wait_health(True)
        healthy_probe = _time(healthy["status"]["conditions"][0]["lastProbeTime"])

        proc.popen.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.describe()
        assert "reporting unhealthy" in proc.stderr()

        # The app is still healthy: the unhealthy report can only be the agent's goodbye.
        def disconnected() -> dict[str, Any] | None:
            entry = mesh.entry()
            annotations = entry["metadata"]["annotations"] if entry else {}
            return entry if "istio.io/disconnectedAt" in annotations else None

        entry = wait_for(disconnected, 5, "the entry to be marked disconnected")
        assert entry["healthy"] is False
        (condition,) = entry["status"]["conditions"]
        assert condition["status"] == "False"
        assert "stopping" in condition["message"], condition
        annotations = entry["metadata"]["annotations"]
        assert "istio.io/connectedAt" not in annotations
        reported = _time(condition["lastProbeTime"])
        assert healthy_probe <= reported <= _time(annotations["istio.io/disconnectedAt"])
        assert mesh.get("/debug/connections")["connections"] == []

        # After the grace period devmesh deletes the entry.
        wait_for(lambda: mesh.entry() is None and mesh.entries() == [], 10, "the entry deleted")
    finally:
        app.close()
