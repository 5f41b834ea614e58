"""``vmagent run`` under systemd's protocols, with systemd's side played by real sockets and
files: ``$NOTIFY_SOCKET`` is a real AF_UNIX datagram socket collecting READY=1 / STATUS= /
WATCHDOG=1 / STOPPING=1 (sd_notify(3)); ``$JOURNAL_STREAM`` names the agent's real stderr
file, so its lines carry ``<N>`` priorities and no timestamps (systemd.exec(5))."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from e2e_helpers import Proc, World, http_get, wait_for


class NotifySocket:
    """systemd's end of sd_notify: a datagram socket recording (monotonic time, message)."""

    def __init__(self, path: Path, status_url: str) -> None:
        self.path = path
        self.status_url = status_url
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.ready_answer: int | None = None  # /healthz/ready asked when READY=1 arrived
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            now = time.monotonic()
            for line in data.decode().split("\n"):
                if line == "READY=1" and self.ready_answer is None:
                    self.ready_answer = http_get(self.status_url + "/healthz/ready")[0]
                self.messages.append((now, line))

    def lines(self, prefix: str = "") -> list[str]:
        return [m for _, m in list(self.messages) if m.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.mark.timeout(90)
def test_ready_only_when_ready_status_watchdog_and_stopping(world: World) -> None:
    mesh = world.devmesh()
    mesh.stop()  # the control plane (and CA) is down when the agent starts
    agent = world.agent(mesh, WATCHDOG_USEC="400000")  # 0.4 s: WATCHDOG=1 every 0.2 s
    notify = NotifySocket(agent.home / "notify.sock", agent.status_url)
    try:
        agent.extra_env["NOTIFY_SOCKET"] = str(notify.path)
        proc = agent.start()
        wait_for(lambda: len(notify.lines("WATCHDOG=1")) >= 3, 10, "three WATCHDOG=1")
        time.sleep(1.0)
        # Not ready (no certificate): no READY=1, and STATUS= says what it waits for.
        assert http_get(agent.status_url + "/healthz/ready")[0] == 503
        assert notify.lines("READY=1") == []
        statuses = notify.lines("STATUS=")
        assert statuses and statuses[0].startswith("STATUS=waiting for certificate"), statuses

        mesh.restart()
        wait_for(lambda: notify.lines("READY=1"), 30, "READY=1")
        assert notify.ready_answer == 200  # /healthz/ready agreed at that moment
        assert notify.lines("STATUS=")[-1] == "STATUS=ready"
        assert len(notify.lines("READY=1")) == 1

        # A stopped (hung) event loop sends no WATCHDOG=1: systemd would restart it.
        os.kill(proc.popen.pid, signal.SIGSTOP)
        try:
            before = len(notify.lines("WATCHDOG=1"))
            time.sleep(1.0)
            assert len(notify.lines("WATCHDOG=1")) == before
        finally:
            os.kill(proc.popen.pid, signal.SIGCONT)
        wait_for(lambda: len(notify.lines("WATCHDOG=1")) > before, 5, "WATCHDOG=1 again")

        assert proc.terminate() == 0
        assert "STOPPING=1" in notify.lines("STOPPING=1")
    finally:
        notify.close()


def test_abstract_notify_socket_is_used(world: World) -> None:
    """``NOTIFY_SOCKET=@name``: the abstract namespace (a leading NUL byte on the wire)."""
    name = f"vmagent-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(15)
    try:
        mesh = world.devmesh()
        agent = world.agent(mesh, NOTIFY_SOCKET="@" + name)
        agent.start()
        assert sock.recv(4096).decode().startswith("STATUS=")
    finally:
        sock.close()


def _start_with_stderr(world: World, agent_env: dict[str, str], stderr: Path) -> Proc:
    """The agent with stderr on ``stderr`` and ``$JOURNAL_STREAM`` naming that file, as
    systemd names its stream socket."""
    with stderr.open("wb") as err:
        info = os.fstat(err.fileno())
        env = {**agent_env, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        popen = subprocess.Popen(
            [sys.executable, "-m", "vmagent", "run"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    proc = Proc("agent-journal", popen, Path(os.devnull), stderr)
    world.procs.procs.append(proc)
    return proc


@pytest.mark.timeout(60)
def test_journal_lines_have_priorities_and_no_timestamps(world: World) -> None:
    mesh = world.devmesh()
    agent = world.agent(mesh, VMAGENT_LOG_LEVEL="debug")
    proc = _start_with_stderr(world, agent.env(), world.tmp / "journal.stderr")
    agent.proc = proc
    agent.wait_ready()
    wait_for(lambda: "<6>vmagent: readiness: ready" in proc.stderr(), 5, "the readiness line")
    assert proc.terminate() == 0
    lines = proc.stderr().splitlines()
    bad = [line for line in lines if not re.match(r"^<[2-7]>", line)]
    assert bad == [], bad
    assert any(line.startswith("<6>vmagent: readiness: ready") for line in lines), lines
    assert any(line.startswith("<7>") for line in lines)  # VMAGENT_LOG_LEVEL=debug
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in lines)


@pytest.mark.timeout(60)
def test_inherited_journal_stream_with_stderr_elsewhere_keeps_terminal_format(
    world: World,
) -> None:
    """A child whose stderr was redirected inherits ``$JOURNAL_STREAM``; it names another
    stream, so lines keep their timestamps (and --log-level beats VMAGENT_LOG_LEVEL)."""
    mesh = world.devmesh()
    agent = world.agent(mesh, JOURNAL_STREAM="1:1", VMAGENT_LOG_LEVEL="debug")
    env = agent.env()
    proc = world.procs.start(
        "agent", [sys.executable, "-m", "vmagent", "--log-level", "info", "run"], env
    )
    agent.proc = proc
    agent.wait_ready()
    assert proc.terminate() == 0
    lines = proc.stderr().splitlines()
    assert lines and all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", x) for x in lines)
    assert not any(" DEBUG " in line for line in lines)
