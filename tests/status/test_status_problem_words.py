"""The words of ``vmagent status`` where they used to mislead: a readiness probe held back
because Envoy is not ready yet does not send the user to the application; without a
certificate the identity's next time is the next attempt, not a rotation."""

from __future__ import annotations

from typing import Any

from test_status_view import NOW, raw_state

from vmagent.agent_envoy import DataPlane
from vmagent.status.render import render
from vmagent.status.view import status_v1


def envoy_not_started_reason() -> str:
    """What the agent's health checker records when Envoy (checked before the application,
    reference §4.2) has not started: the real DataPlane's words."""
    envoy = object.__new__(DataPlane)
    envoy.envoy = None
    reason = envoy.not_ready_reason()
    assert reason is not None
    return reason


def health_problem(message: str) -> dict[str, Any]:
    health = raw_state()["health"] | {
        "state": "unhealthy", "lastResult": {"healthy": False, "message": message},
    }  # fmt: skip
    view = status_v1(raw_state(health=health), NOW)
    (problem,) = [p for p in view["problems"] if p["part"] == "health"]
    return problem


def test_probe_held_back_by_envoy_does_not_blame_the_application() -> None:
    problem = health_problem(envoy_not_started_reason())
    assert "Envoy is not ready" in problem["message"], problem
    assert "Envoy not started yet" in problem["message"], problem
    assert "check the application" not in problem["action"], problem
    assert "Envoy" in problem["action"], problem


def test_a_failing_application_probe_still_points_at_the_application() -> None:
    problem = health_problem("HTTP 503")
    assert problem["message"] == "the readiness probe fails: HTTP 503"
    assert problem["action"].startswith("check the application on this VM")


def test_without_a_certificate_the_next_time_is_an_attempt() -> None:
    identity = raw_state()["identity"] | {
        "spiffe_id": None, "serial": None, "not_after": None, "next_rotation": NOW + 14,
        "last_error": "CA unreachable",
    }  # fmt: skip
    text = render(status_v1(raw_state(identity=identity), NOW))
    assert "next rotation" not in text, text
    (line,) = [ln for ln in text.splitlines() if "next attempt" in ln]
    assert line.rstrip().endswith("(in 14s)"), line


def test_with_a_certificate_the_next_time_is_its_rotation() -> None:
    text = render(status_v1(raw_state(), NOW))
    assert "next rotation" in text and "next attempt" not in text
