"""Threshold state machine: probe results in, health transitions out. Pure: no clock, no I/O.

Semantics of ``PerformApplicationHealthCheck`` in Istio's
``pkg/istio-agent/health/health_check.go``:

- consecutive counters: a success resets the failure count and vice versa;
- the state starts *unknown*; the first event fires as soon as either threshold is reached, so a
  workload that never becomes healthy is still reported unhealthy;
- afterwards an event fires only on a state change (``successThreshold`` consecutive successes
  while not healthy, ``failureThreshold`` consecutive failures while not unhealthy); the counter
  that fired is reset;
- an unhealthy event carries the error message of the probe that tipped it over.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["HealthEvent", "HealthState", "ProbeResult", "Thresholds"]


class HealthState(enum.Enum):
    """The reported health: nothing reported yet, healthy, or unhealthy."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class ProbeResult:
    """One probe's outcome; ``message`` says why it failed (empty when healthy)."""

    healthy: bool
    message: str = ""

    @classmethod
    def ok(cls) -> ProbeResult:
        return cls(True)

    @classmethod
    def failed(cls, message: str) -> ProbeResult:
        return cls(False, message or "probe failed")


@dataclass(frozen=True)
class HealthEvent:
    """A health transition to report (Istio's ``ProbeEvent``).

    The xDS client turns it into a ``type.googleapis.com/istio.v1.HealthInformation`` request:
    no ``error_detail`` when healthy, ``error_detail{code: 13, message}`` when not.
    """

    healthy: bool
    message: str = ""

    @property
    def state(self) -> HealthState:
        return HealthState.HEALTHY if self.healthy else HealthState.UNHEALTHY


class Thresholds:
    """Consecutive success/failure counting; :meth:`observe` returns an event on a transition."""

    def __init__(self, success_threshold: int = 1, failure_threshold: int = 1) -> None:
        if success_threshold < 1 or failure_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        self.success_threshold = success_threshold
        self.failure_threshold = failure_threshold
        self.state = HealthState.UNKNOWN
        self.successes = 0
        self.failures = 0

    def observe(self, result: ProbeResult) -> HealthEvent | None:
        """Count ``result``; return the event to report, or ``None`` if the state is unchanged."""
        if result.healthy:
            self.successes += 1
            self.failures = 0
            if self.successes >= self.success_threshold and self.state is not HealthState.HEALTHY:
                self.successes = 0
                self.state = HealthState.HEALTHY
                return HealthEvent(healthy=True)
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= self.failure_threshold and self.state is not HealthState.UNHEALTHY:
                self.failures = 0
                self.state = HealthState.UNHEALTHY
                return HealthEvent(healthy=False, message=result.message or "probe failed")
        return None
