"""The supervisor with the real Envoy: LIVE over a real ADS stream (SotW and delta), output in
the agent's log, crash -> restart with backoff, graceful drain on stop, and no Envoy left
behind when the agent dies (even by SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from envoy_helpers import (
    FakeAds,
    holding_backend,
    loopback_options,
    make_config,
    make_node,
    serving_ads,
    short_dir,
    until,
)
from google.protobuf import json_format
from loopback import free_port

from vmagent.envoy import EnvoySupervisor, resolve_binary
from vmagent.envoy.lifecycle import RestartPolicy
from vmagent.envoy.options import EnvoyOptions
from vmagent.status import StatusServer

FAST = RestartPolicy(base=0.2, cap=1.0, stable_seconds=60.0)


@contextlib.asynccontextmanager
async def envoy_under_supervisor(
    folder: Path, env: dict[str, str] | None = None, **overrides: Any
) -> AsyncIterator[tuple[EnvoySupervisor, FakeAds, EnvoyOptions, list[asyncio.StreamWriter]]]:
    """A fake xDS proxy, the agent's status server and a held-open backend on loopback, and a
    running supervisor; Envoy is stopped (gracefully if the test did not) at the end."""
    config = make_config(folder, VMAGENT_ENVOY_LOG_LEVEL="info", **(env or {}))
    status_port = free_port()
    options = loopback_options(config, status_port=status_port, **overrides)
    node = make_node(config)
    status = StatusServer(lambda: {"not_ready": []})
    await status.listen_tcp("127.0.0.1", status_port)
    async with holding_backend() as (backend_port, held):
        ads = FakeAds(inbound_port=free_port(), backend_port=backend_port)
        async with serving_ads(options.xds_socket, ads):
            supervisor = EnvoySupervisor(options, node, resolve_binary("", ""), policy=FAST)
            task = asyncio.ensure_future(supervisor.run())
            try:
                yield supervisor, ads, options, held
            finally:
                await asyncio.wait_for(supervisor.stop(), 30)
                await asyncio.wait_for(task, 10)
    await status.close()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("delta", [True, False])
def test_envoy_goes_live_presenting_the_agent_node(
    delta: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmagent.envoy")
    env = {} if delta else {"ISTIO_DELTA_XDS": "false"}

    async def scenario(folder: Path) -> None:
        async with envoy_under_supervisor(folder, env) as (supervisor, ads, options, _):
            assert not supervisor.live and supervisor.not_ready_reason()
            await until(lambda: supervisor.live, 20)
            assert ads.kinds[0] == ("delta" if delta else "sotw")
            presented = ads.nodes[0]
            assert presented.id == supervisor.node.id
            assert presented.cluster == supervisor.node.cluster
            assert json_format.MessageToDict(presented.metadata) == json.loads(
                json.dumps(dict(supervisor.node.metadata))
            )
            status = supervisor.status()
            assert status["state"] == "live" and status["restarts"] == 0
            assert status["last_exit"] is None and status["not_ready"] is None
            assert psutil.Process(status["pid"]).name() == "envoy"
            assert status["started"].endswith("Z") and "T" in status["started"]
            assert status["process"]["rss_bytes"] > 1_000_000
            assert status["process"]["children"] == 0
            # Envoy's readiness port answers from the agent's status endpoint...
            code, body = await asyncio.to_thread(http_get, options.readiness_port, "/healthz/ready")
            assert (code, body) == (200, "ready\n")
            # ... and its Prometheus port serves Envoy's own stats.
            code, body = await asyncio.to_thread(
                http_get, options.prometheus_port, "/stats/prometheus"
            )
            assert code == 200 and "envoy_server_live" in body

    with short_dir() as folder:
        asyncio.run(scenario(folder))
    lines = [r for r in caplog.records if r.getMessage().startswith("envoy: [")]
    assert any("starting main dispatch loop" in r.getMessage() for r in lines)
    # Envoy's own level carries over: its warnings are warnings in the agent's log.
    assert any(r.levelno == logging.WARNING and "[warning]" in r.getMessage() for r in lines)


def test_crashed_envoy_is_restarted_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vmagent.envoy")

    async def scenario(folder: Path) -> None:
        async with envoy_under_supervisor(folder) as (supervisor, _, options, _):
            await until(lambda: supervisor.live, 20)
            for crash in (1, 2):
                old = supervisor.status()["pid"]
                os.kill(old, signal.SIGKILL)
                await until(lambda: supervisor.status()["state"] == "backoff", 10, 0.01)
                status = supervisor.status()
                assert status["last_exit"] == "SIGKILL" and status["restarts"] == crash
                assert not supervisor.live and "SIGKILL" in str(supervisor.not_ready_reason())
                await until(lambda: supervisor.live, 20)
                assert supervisor.status()["pid"] != old
            assert supervisor.lifecycle.failures == 2  # consecutive: the backoff grew
            code, _ = await asyncio.to_thread(http_get, options.admin_port, "/ready")
            assert code == 200

    with short_dir() as folder:
        asyncio.run(scenario(folder))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(m.startswith("envoy exited (SIGKILL); restart 1 in") for m in errors)
    assert any(m.startswith("envoy exited (SIGKILL); restart 2 in") for m in errors)


def test_stop_drains_inbound_listeners_then_terminates(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vmagent.envoy")

    async def scenario(folder: Path) -> None:
        async with envoy_under_supervisor(
            folder, drain_duration=1.0, termination_drain_duration=4.0
        ) as (supervisor, ads, options, _):
            await until(lambda: supervisor.live, 20)
            pid = supervisor.status()["pid"]
            assert await asyncio.to_thread(accepts, ads.inbound_port)
            started = time.monotonic()
            stopping = asyncio.ensure_future(supervisor.stop())
            again = asyncio.ensure_future(supervisor.stop())  # e.g. SIGTERM twice: one drain

            # Inbound listeners drain (closed after --drain-time-s) while Envoy still runs
            # and still answers readiness: the agent waits terminationDrainDuration.
            async def stopped_listeners() -> int:
                stats = await supervisor.admin.stats("^listener_manager.listener_stopped$")
                return stats.get("listener_manager.listener_stopped", 0)

            await until(stopped_listeners, 10)
            assert await stopped_listeners() == 1  # the inbound one; 15021/15090 stay
            assert not await asyncio.to_thread(accepts, ads.inbound_port)
            assert await asyncio.to_thread(accepts, options.readiness_port)
            assert psutil.pid_exists(pid) and supervisor.status()["state"] == "draining"
            await asyncio.wait_for(asyncio.gather(stopping, again), 20)
            assert time.monotonic() - started >= 3.5  # waited terminationDrainDuration
            assert not psutil.pid_exists(pid)
            status = supervisor.status()
            assert status["state"] == "stopped" and status["pid"] is None
            assert status["last_exit"] == 0 and status["restarts"] == 0

    with short_dir() as folder:
        asyncio.run(scenario(folder))
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("envoy: draining inbound listeners") == 1
    assert any(m.startswith("envoy: sending SIGTERM") for m in messages)


def test_exit_on_zero_active_connections_waits_for_the_last_one() -> None:
    async def scenario(folder: Path) -> None:
        async with envoy_under_supervisor(
            folder,
            {"EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true", "MINIMUM_DRAIN_DURATION": "0.5s"},
            drain_duration=30.0,
            termination_drain_duration=60.0,
        ) as (supervisor, ads, _, held):
            await until(lambda: supervisor.live, 20)
            _, writer = await asyncio.open_connection("127.0.0.1", ads.inbound_port)
            await until(lambda: held, 10)  # Envoy proxied it to the backend
            pid = supervisor.status()["pid"]
            started = time.monotonic()
            stopping = asyncio.ensure_future(supervisor.stop())
            await asyncio.sleep(3.0)
            assert not stopping.done() and psutil.pid_exists(pid)  # one connection left
            writer.close()
            await asyncio.wait_for(stopping, 15)
            assert 3.0 <= time.monotonic() - started < 15  # not the 60 s termination drain
            assert not psutil.pid_exists(pid)

    with short_dir() as folder:
        asyncio.run(scenario(folder))


def test_cancelled_run_leaves_no_envoy() -> None:
    async def scenario(folder: Path) -> None:
        config = make_config(folder)
        options = loopback_options(config)
        supervisor = EnvoySupervisor(options, make_node(config), resolve_binary("", ""))
        task = asyncio.ensure_future(supervisor.run())
        await until(lambda: supervisor.status()["pid"] is not None, 10)
        pid = supervisor.status()["pid"]
        # No ADS server: Envoy still starts and answers on admin, but is not LIVE.
        await until(lambda: "PRE_INITIALIZING" in str(supervisor.not_ready_reason()), 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await until(lambda: not psutil.pid_exists(pid), 5)

    with short_dir() as folder:
        asyncio.run(scenario(folder))


AGENT = """
import asyncio, sys
sys.path[:0] = {paths!r}
from envoy_helpers import loopback_options, make_config, make_node
from pathlib import Path
from vmagent.envoy import EnvoySupervisor, resolve_binary

async def main():
    config = make_config(Path({folder!r}))
    options, node = loopback_options(config), make_node(config)
    supervisor = EnvoySupervisor(options, node, resolve_binary("", ""))
    task = asyncio.ensure_future(supervisor.run())
    while supervisor.status()["pid"] is None:
        await asyncio.sleep(0.05)
    print(supervisor.status()["pid"], flush=True)
    await task

asyncio.run(main())
"""


def test_envoy_dies_when_the_agent_is_killed_with_sigkill() -> None:
    here = Path(__file__).resolve().parent
    with short_dir() as folder:
        script = AGENT.format(paths=[str(here), str(here.parent)], folder=str(folder))
        agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        envoy_pid = 0
        try:
            assert agent.stdout is not None
            envoy_pid = int(agent.stdout.readline())
            envoy = psutil.Process(envoy_pid)
            assert envoy.ppid() == agent.pid and envoy.is_running()
            agent.kill()  # SIGKILL: no handler, no cleanup code runs in the agent
            agent.wait(10)
            envoy.wait(5)  # psutil.TimeoutExpired if it outlived the agent
            assert not psutil.pid_exists(envoy_pid)
        finally:
            agent.kill()
            agent.wait(10)
            if envoy_pid and psutil.pid_exists(envoy_pid):  # do not leak it on failure
                os.kill(envoy_pid, signal.SIGKILL)
