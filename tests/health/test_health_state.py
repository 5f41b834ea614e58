"""The pure threshold state machine: Istio's consecutive-count, edge-triggered semantics."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmagent.health import HealthEvent, HealthState, ProbeResult, Thresholds

OK = ProbeResult.ok()


def bad(message: str = "boom") -> ProbeResult:
    return ProbeResult.failed(message)


def feed(machine: Thresholds, results: list[ProbeResult]) -> list[tuple[int, HealthEvent]]:
    """(index of the result that fired, event) for every event."""
    out = []
    for i, result in enumerate(results):
        event = machine.observe(result)
        if event is not None:
            out.append((i, event))
    return out


def test_first_success_reports_healthy_then_stays_quiet() -> None:
    machine = Thresholds()
    assert machine.state is HealthState.UNKNOWN
    assert feed(machine, [OK, OK, OK]) == [(0, HealthEvent(healthy=True))]
    assert machine.state is HealthState.HEALTHY


def test_a_workload_that_never_comes_up_is_reported_unhealthy_with_the_message() -> None:
    machine = Thresholds()
    events = feed(machine, [bad("connection refused"), bad("still refused")])
    assert events == [(0, HealthEvent(healthy=False, message="connection refused"))]
    assert machine.state is HealthState.UNHEALTHY
    assert events[0][1].state is HealthState.UNHEALTHY


def test_events_only_on_transitions() -> None:
    events = feed(Thresholds(), [OK, OK, bad("a"), bad("b"), OK, bad("c")])
    assert events == [
        (0, HealthEvent(True)),
        (2, HealthEvent(False, "a")),
        (4, HealthEvent(True)),
        (5, HealthEvent(False, "c")),
    ]


def test_success_threshold_needs_consecutive_successes() -> None:
    machine = Thresholds(success_threshold=3, failure_threshold=1)
    events = feed(machine, [OK, OK, bad("x"), OK, OK, OK, OK])
    # the failure at index 2 fires at once (threshold 1) and resets the success run
    assert events == [(2, HealthEvent(False, "x")), (5, HealthEvent(True))]


def test_failure_threshold_needs_consecutive_failures_and_reports_the_tipping_message() -> None:
    machine = Thresholds(success_threshold=1, failure_threshold=3)
    events = feed(machine, [OK, bad("1"), bad("2"), OK, bad("3"), bad("4"), bad("5"), bad("6")])
    assert events == [(0, HealthEvent(True)), (6, HealthEvent(False, "5"))]
    assert machine.state is HealthState.UNHEALTHY


def test_first_event_comes_from_whichever_threshold_is_reached_first() -> None:
    machine = Thresholds(success_threshold=2, failure_threshold=2)
    assert feed(machine, [OK, bad("a"), OK, bad("b"), bad("c")]) == [(4, HealthEvent(False, "c"))]


def test_counters_are_visible_for_the_status_page() -> None:
    machine = Thresholds(success_threshold=5, failure_threshold=5)
    feed(machine, [bad("a"), OK, OK])
    assert (machine.successes, machine.failures) == (2, 0)


def test_failed_result_always_has_a_message() -> None:
    assert feed(Thresholds(), [ProbeResult(False)]) == [(0, HealthEvent(False, "probe failed"))]


@pytest.mark.parametrize(("success", "failure"), [(0, 1), (1, 0), (-1, 3)])
def test_thresholds_below_one_are_rejected(success: int, failure: int) -> None:
    with pytest.raises(ValueError):
        Thresholds(success, failure)


def istio_reference(success: int, failure: int, results: list[bool]) -> list[tuple[int, bool]]:
    """A transliteration of health_check.go's doCheck loop (``==`` comparisons, tri-state)."""
    num_success = num_fail = 0
    last = "undefined"
    out = []
    for i, healthy in enumerate(results):
        if healthy:
            num_success += 1
            num_fail = 0
            if num_success == success and last != "healthy":
                out.append((i, True))
                num_success = 0
                last = "healthy"
        else:
            num_fail += 1
            num_success = 0
            if num_fail == failure and last != "unhealthy":
                out.append((i, False))
                num_fail = 0
                last = "unhealthy"
    return out


@given(
    success=st.integers(1, 4),
    failure=st.integers(1, 4),
    results=st.lists(st.booleans(), max_size=60),
)
def test_matches_istio_health_check_go(success: int, failure: int, results: list[bool]) -> None:
    machine = Thresholds(success, failure)
    got = feed(machine, [OK if r else bad(f"fail {i}") for i, r in enumerate(results)])
    assert [(i, e.healthy) for i, e in got] == istio_reference(success, failure, results)
    for i, event in got:
        assert event.message == ("" if event.healthy else f"fail {i}")
    # strictly alternating: never the same state twice in a row
    states = [e.healthy for _, e in got]
    assert all(a != b for a, b in itertools.pairwise(states))
