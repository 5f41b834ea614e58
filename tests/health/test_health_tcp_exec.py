"""TCP and exec probes: a real port opened and closed, real shell scripts and processes."""

from __future__ import annotations

import asyncio
import socket
import stat
from pathlib import Path

from health_helpers import (
    Events,
    free_port,
    kill_quietly,
    read_pid,
    run,
    running,
    spec,
    until,
    wait_until_gone,
)

from vmagent.health import HealthChecker, HealthState, ProbeResult, run_probe


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


# --- TCP -----------------------------------------------------------------------------------


def test_tcp_open_port_is_healthy_closed_port_is_not() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert run(run_probe(spec({"tcpSocket": {"port": port}}))) == ProbeResult.ok()
    result = run(run_probe(spec({"tcpSocket": {"port": port, "host": "127.0.0.1"}})))
    assert not result.healthy
    assert result.message == f"dial tcp 127.0.0.1:{port}: connect: connection refused"


def test_tcp_unknown_host_is_unhealthy_with_a_lookup_message() -> None:
    result = run(run_probe(spec({"tcpSocket": {"port": 80, "host": "no-such-host.invalid"}})))
    assert not result.healthy
    assert result.message.startswith("dial tcp no-such-host.invalid:80: lookup failed")


def test_checker_follows_a_port_closed_opened_closed() -> None:
    port = free_port()

    async def scenario() -> None:
        events = Events()
        checker = HealthChecker(spec({"tcpSocket": {"port": port}}, period_seconds=0.05), events)
        async with running(checker):
            first = await events.next()
            assert not first.healthy  # never came up: still reported
            assert "connection refused" in first.message
            server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
            async with server:
                assert (await events.next()).healthy
                assert checker.state is HealthState.HEALTHY
            assert not (await events.next()).healthy

    run(scenario())


# --- exec ----------------------------------------------------------------------------------


def test_exec_exit_zero_is_healthy(tmp_path: Path) -> None:
    ok = script(tmp_path, "ok.sh", "exit 0\n")
    assert run(run_probe(spec({"exec": {"command": [ok]}}))) == ProbeResult.ok()


def test_exec_nonzero_exit_reports_status_and_output(tmp_path: Path) -> None:
    fail = script(tmp_path, "fail.sh", 'echo "database is down: $1" >&2\nexit 3\n')
    result = run(run_probe(spec({"exec": {"command": [fail, "db1"]}})))
    assert result == ProbeResult(False, f"command {fail}: exit status 3: database is down: db1")


def test_exec_missing_command_is_unhealthy(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    result = run(run_probe(spec({"exec": {"command": [missing]}})))
    assert result == ProbeResult(False, f"exec {missing}: no such file or directory")


def test_exec_that_leaves_a_background_child_is_not_held_up_by_it(tmp_path: Path) -> None:
    # The child keeps stdout/stderr; the probe must still end when the command exits.
    body = f"sleep 30 &\necho $! > {tmp_path}/child.pid\necho started\nexit 0\n"
    daemonizing = script(tmp_path, "bg.sh", body)
    try:
        result = run(run_probe(spec({"exec": {"command": [daemonizing]}}, timeout_seconds=5)))
        assert result == ProbeResult.ok()
    finally:
        kill_quietly(read_pid(tmp_path / "child.pid"))


def hanging_script(tmp_path: Path) -> str:
    return script(
        tmp_path,
        "hang.sh",
        f"sleep 60 &\necho $! > {tmp_path}/child.pid\necho $$ > {tmp_path}/self.pid\nwait\n",
    )


def test_exec_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    hang = hanging_script(tmp_path)
    try:
        result = run(run_probe(spec({"exec": {"command": [hang]}}, timeout_seconds=0.5)))
        pids = [read_pid(tmp_path / "self.pid"), read_pid(tmp_path / "child.pid")]
        assert result == ProbeResult(False, f"command {hang}: timed out after 0.5s")
        assert wait_until_gone(pids) == []
    finally:
        for name in ("self.pid", "child.pid"):
            if (tmp_path / name).exists():
                kill_quietly(read_pid(tmp_path / name))


def test_cancelling_the_checker_mid_probe_kills_the_exec_group(tmp_path: Path) -> None:
    hang = hanging_script(tmp_path)

    async def scenario() -> None:
        checker = HealthChecker(
            spec({"exec": {"command": [hang]}}, timeout_seconds=30), lambda e: None
        )
        async with running(checker) as task:
            await until(lambda: (tmp_path / "self.pid").exists())  # written last
        assert task.cancelled()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    try:
        run(scenario())
        pids = [read_pid(tmp_path / "self.pid"), read_pid(tmp_path / "child.pid")]
        assert wait_until_gone(pids) == []
    finally:
        for name in ("self.pid", "child.pid"):
            if (tmp_path / name).exists():
                kill_quietly(read_pid(tmp_path / name))
