"""Readiness transitions worth a log line: the first state, ready <-> not ready, new reasons."""

from __future__ import annotations

from vmagent.status import ReadinessLog


def test_transitions_are_reported_once_each() -> None:
    log = ReadinessLog()
    no_cert = ["no valid workload certificate", "control plane not connected yet"]
    assert log.observe(no_cert) == (
        "readiness: not ready: no valid workload certificate; control plane not connected yet"
    )
    assert log.observe(no_cert) is None  # unchanged: no line
    assert log.observe(["control plane not connected yet"]) == (
        "readiness: not ready: control plane not connected yet"
    )
    assert log.observe([]) == "readiness: ready (was not ready)"
    assert log.observe([]) is None
    assert log.observe(["name table not loaded"]) == (
        "readiness: not ready (was ready): name table not loaded"
    )


def test_ready_from_the_start() -> None:
    assert ReadinessLog().observe([]) == "readiness: ready"
