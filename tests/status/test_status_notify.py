"""sd_notify (sd_notify(3)): what is sent when, to path and abstract sockets, for real."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from vmagent.status.notify import (
    EXTEND_EVERY_SECONDS,
    EXTEND_SECONDS,
    Notifier,
    NotifyState,
    progress,
    watchdog_interval,
)


def test_status_lines_while_starting_then_ready_once() -> None:
    state = NotifyState()
    assert state.observe(["no valid workload certificate", "name table not loaded"]) == [
        "STATUS=waiting for certificate (no valid workload certificate; name table not loaded)"
    ]
    assert state.observe(["no valid workload certificate", "name table not loaded"]) == []
    assert state.observe(["name table not loaded"]) == [
        "STATUS=waiting for name table (name table not loaded)"
    ]
    assert state.observe(["Envoy not ready: server state PRE_INITIALIZING"])[0].startswith(
        "STATUS=waiting for Envoy"
    )
    assert state.observe([]) == ["STATUS=ready", "READY=1"]
    assert state.observe(["control plane not connected yet"]) == [
        "STATUS=waiting for control plane (control plane not connected yet)"
    ]
    assert state.observe([]) == ["STATUS=ready"]  # READY=1 only once
    assert progress([]) == "ready"


def test_watchdog_interval_is_half_the_period_for_this_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 7) is None
    assert watchdog_interval({}, 7) is None


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_messages_reach_path_and_abstract_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with _receiver(path) as sock:
        Notifier({"NOTIFY_SOCKET": path}).send("READY=1", "STATUS=ready")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ready"
    name = f"vmagent-notify-test-{os.getpid()}"
    with _receiver("\0" + name) as sock:
        Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_without_notify_socket_nothing_is_sent_and_a_gone_socket_is_harmless(
    tmp_path: Path,
) -> None:
    assert not Notifier({}).enabled
    Notifier({}).send("READY=1")
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")}).send("READY=1")  # logged only


@pytest.mark.timeout(10)
def test_a_receiver_that_stops_reading_never_blocks_the_sender(tmp_path: Path) -> None:
    """Linux queues ~10 unread datagrams per socket; a blocking send would then hang the
    agent's event loop for as long as systemd does not read."""
    path = str(tmp_path / "notify.sock")
    with _receiver(path):
        notifier = Notifier({"NOTIFY_SOCKET": path})
        started = time.monotonic()
        for _ in range(200):
            notifier.send("WATCHDOG=1")
        assert time.monotonic() - started < 2.0


def test_run_pings_the_watchdog_from_the_loop(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    reasons: list[str] = ["no valid workload certificate"]
    got: list[str] = []

    def receive(sock: socket.socket, stop: threading.Event) -> None:
        sock.settimeout(0.05)
        while not stop.is_set():
            try:
                got.extend(sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                continue

    async def scenario() -> None:
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        task = asyncio.ensure_future(notifier.run(lambda: list(reasons)))
        await asyncio.sleep(0.35)
        reasons.clear()
        await asyncio.sleep(0.7)
        task.cancel()

    with _receiver(path) as sock:
        stop = threading.Event()
        thread = threading.Thread(target=receive, args=(sock, stop))
        thread.start()
        try:
            asyncio.run(scenario())
            time.sleep(0.2)
        finally:
            stop.set()
            thread.join(5)
    assert got[0] == "STATUS=waiting for certificate (no valid workload certificate)"
    assert got.count("READY=1") == 1
    assert got.index("READY=1") > got.index("STATUS=ready") > 0
    assert got.count("WATCHDOG=1") >= 6  # every 0.1 s for ~1 s


def test_a_start_still_waiting_extends_the_start_timeout_until_ready() -> None:
    """EXTEND_TIMEOUT_USEC every EXTEND_EVERY_SECONDS while not ready, none after READY=1:
    a start waiting for istiod is not killed at TimeoutStartSec (the boot test
    test_install_does_not_wait_for_an_unreachable_istiod shows it under systemd)."""
    state = NotifyState()
    extend = f"EXTEND_TIMEOUT_USEC={int(EXTEND_SECONDS * 1e6)}"
    assert extend in state.observe(["control plane not connected yet"], 100.0)
    assert state.observe(["control plane not connected yet"], 101.0) == []
    due = 100.0 + EXTEND_EVERY_SECONDS
    assert state.observe(["control plane not connected yet"], due) == [extend]
    assert EXTEND_EVERY_SECONDS < EXTEND_SECONDS / 2  # two chances before it runs out
    assert state.observe([], due + 1) == ["STATUS=ready", "READY=1"]
    assert state.observe(["control plane not connected yet"], due + 100)[1:] == []
