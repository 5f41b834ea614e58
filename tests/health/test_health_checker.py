"""The runner: initial delay, period, thresholds, callbacks, status, clean cancellation."""

from __future__ import annotations

import asyncio
import socket

import pytest
from health_helpers import Events, app_server, run, running, spec, until

from vmagent.health import HealthChecker, HealthEvent, HealthState, ProbeResult


def test_thresholds_count_real_probes() -> None:
    # Each request takes the next scripted status, so events land on exact probe numbers.
    script = [503, 503, 200, 200, 503, 200, 200, 200, 200, 503, 200, 503, 503]
    # probe no.: 1    2    3    4    5    6    7    8    9    10   11   12   13
    # events:         ^unhealthy (2 consecutive)       ^healthy (3 consecutive)   ^unhealthy

    async def scenario() -> None:
        events = Events(note=app.count)
        probe = spec(
            {"httpGet": {"port": app.port}, "successThreshold": 3, "failureThreshold": 2},
            period_seconds=0.02,
        )
        async with running(HealthChecker(probe, events)):
            for _ in range(3):
                await events.next()
        assert [(e.healthy, n) for e, n in zip(events.all, events.notes)] == [
            (False, 2),
            (True, 8),
            (False, 13),
        ]
        assert events.all[0].message == "status code was not from [200,400), bad code 503"

    with app_server() as app:
        app.script = list(script)
        run(scenario())


def test_initial_delay_comes_before_the_first_probe() -> None:
    async def scenario() -> None:
        events = Events(note=app.count)
        probe = spec(
            {"httpGet": {"port": app.port}}, initial_delay_seconds=0.4, period_seconds=0.05
        )
        async with running(HealthChecker(probe, events)):
            await asyncio.sleep(0.1)
            assert app.count() == 0  # still in the initial delay
            assert (await events.next()).healthy
        assert events.notes == [1]  # the first probe right after the delay

    with app_server() as app:
        run(scenario())


def test_status_snapshot_for_the_status_page() -> None:
    async def scenario() -> None:
        events = Events()
        checker = HealthChecker(spec({"httpGet": {"port": app.port}}, period_seconds=0.02), events)
        before = checker.status()
        assert before.state is HealthState.UNKNOWN
        assert before.last_result is None
        async with running(checker):
            await events.next()
            await until(lambda: checker.status().probes >= 3)
        status = checker.status().as_dict()
        assert status["probe"] == "httpGet"
        assert status["state"] == "unhealthy"
        assert status["lastEvent"] == {
            "healthy": False,
            "message": "status code was not from [200,400), bad code 500",
        }
        assert status["lastResult"] == status["lastEvent"]
        assert isinstance(status["consecutiveFailures"], int)
        assert status["consecutiveFailures"] >= 2
        assert checker.last_event == HealthEvent(False, status["lastEvent"]["message"])

    with app_server() as app:
        app.status = 500
        run(scenario())


def test_failing_pre_check_is_unhealthy_and_skips_the_app_probe() -> None:
    envoy_ready = False

    async def envoy_check() -> ProbeResult:
        return ProbeResult.ok() if envoy_ready else ProbeResult.failed("envoy not ready: LDS")

    async def scenario() -> None:
        nonlocal envoy_ready
        events = Events()
        probe = spec({"httpGet": {"port": app.port}}, period_seconds=0.02)
        async with running(HealthChecker(probe, events, pre_checks=[envoy_check])):
            assert await events.next() == HealthEvent(False, "envoy not ready: LDS")
            assert app.count() == 0
            envoy_ready = True
            assert (await events.next()).healthy
        assert app.count() >= 1

    with app_server() as app:
        run(scenario())


def test_async_callback_is_awaited() -> None:
    async def scenario() -> list[HealthEvent]:
        got: list[HealthEvent] = []

        async def report(event: HealthEvent) -> None:
            await asyncio.sleep(0)
            got.append(event)

        checker = HealthChecker(spec({"httpGet": {"port": app.port}}), report)
        assert await checker.check_once() == HealthEvent(True)
        assert await checker.check_once() is None
        return got

    with app_server() as app:
        assert run(scenario()) == [HealthEvent(True)]


def test_a_failing_callback_ends_run_with_its_error() -> None:
    def report(event: HealthEvent) -> None:
        raise RuntimeError("xds gone")

    async def scenario() -> None:
        checker = HealthChecker(spec({"httpGet": {"port": app.port}}, period_seconds=0.02), report)
        await asyncio.wait_for(checker.run(), 10)

    with app_server() as app, pytest.raises(RuntimeError, match="xds gone"):
        run(scenario())


def test_cancel_during_a_hanging_probe_stops_cleanly() -> None:
    async def scenario() -> None:
        with socket.socket() as listener:  # accepts (backlog) but never answers
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            probe = spec({"httpGet": {"port": port, "host": "127.0.0.1"}}, timeout_seconds=30)
            checker = HealthChecker(probe, lambda e: None)
            async with running(checker) as task:
                await asyncio.sleep(0.2)  # the probe is waiting for a response
            assert task.cancelled()
            assert checker.status().probes == 0
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(scenario())
