"""When to renew the workload certificate: a pure state machine, time and randomness passed in.

Istio's rule (``security/pkg/nodeagent/cache/secretcache.go``): rotate when ``ratio`` of the
lifetime has passed, with ``ratio = clamp(SECRET_GRACE_PERIOD_RATIO + U[-1,1) x
SECRET_GRACE_PERIOD_RATIO_JITTER, 0, 1)``, measured from the time the cert was received. A
failed renewal is retried with exponential backoff (never sleeping past half of what is left of
the cert) for as long as it takes; the old cert stays in service meanwhile.

vmagent adds a floor Istio lacks: whatever the configuration, the certificate lifetime the CA
chose, or the errors, no two CSRs go out less than :data:`MIN_CSR_INTERVAL` seconds apart (a
ratio of 7, or a CA that issues 1-second certificates, made the agent ask for hundreds of
certificates per second).
"""

from __future__ import annotations

import dataclasses
import math

MIN_CSR_INTERVAL = 5.0  # seconds between two CSRs, always
RETRY_BASE = MIN_CSR_INTERVAL  # first retry after a failure; doubles up to RETRY_CAP
RETRY_CAP = 60.0
RETRY_JITTER = 0.1


@dataclasses.dataclass(frozen=True)
class Schedule:
    ratio: float = 0.5
    jitter: float = 0.01
    retry_base: float = RETRY_BASE
    retry_cap: float = RETRY_CAP


@dataclasses.dataclass(frozen=True)
class RotationState:
    created: float | None = None  # current cert: received at (UNIX seconds)
    expires: float | None = None  # current cert: NotAfter (UNIX seconds)
    rotate_at: float | None = None
    failures: int = 0
    retry_at: float | None = None
    last_error: str = ""
    last_attempt: float | None = None  # when the last CSR went out (UNIX seconds)

    @property
    def has_cert(self) -> bool:
        return self.expires is not None

    def next_attempt(self) -> float | None:
        """When the next renewal is due (None: right away), the CSR floor included."""
        due = self.retry_at if self.failures else self.rotate_at
        if self.last_attempt is None:
            return due
        floor = self.last_attempt + MIN_CSR_INTERVAL
        return floor if due is None else max(due, floor)


@dataclasses.dataclass(frozen=True)
class Renew:
    reason: str


@dataclasses.dataclass(frozen=True)
class Wait:
    until: float


def _clamp_ratio(value: float) -> float:
    return min(1.0, max(0.0, value)) if math.isfinite(value) else 0.5


def rotation_time(created: float, expires: float, schedule: Schedule, r: float) -> float:
    """``r`` in [-1, 1) picks the jitter; the result is clamped into [created, expires]."""
    ratio = _clamp_ratio(
        schedule.ratio + r * (schedule.jitter if math.isfinite(schedule.jitter) else 0.0)
    )
    return expires - ratio * max(0.0, expires - created)


def on_attempt(state: RotationState, now: float) -> RotationState:
    """A CSR is going out at ``now``."""
    return dataclasses.replace(state, last_attempt=now)


def on_issued(
    state: RotationState, created: float, expires: float, schedule: Schedule, r: float
) -> RotationState:
    """A new cert is in service. Its rotation point is never sooner than MIN_CSR_INTERVAL
    after it was received (a very short or already-expired cert must not loop)."""
    rotate_at = max(rotation_time(created, expires, schedule, r), created + MIN_CSR_INTERVAL)
    return RotationState(
        created=created,
        expires=expires,
        rotate_at=rotate_at,
        last_error="",
        last_attempt=state.last_attempt,
    )


def retry_delay(failures: int, schedule: Schedule, r: float) -> float:
    """Exponential backoff for the ``failures``-th consecutive failure, ``r`` in [-1, 1)."""
    base = min(schedule.retry_cap, schedule.retry_base * 2.0 ** min(30, max(0, failures - 1)))
    return base * (1.0 + r * RETRY_JITTER)


def on_failure(
    state: RotationState, error: str, now: float, schedule: Schedule, r: float
) -> RotationState:
    """Back off; while the cert is valid, retry before it expires (at half of what is left),
    but never sooner than MIN_CSR_INTERVAL."""
    failures = state.failures + 1
    delay = retry_delay(failures, schedule, r)
    if state.expires is not None and state.expires > now:
        delay = min(delay, (state.expires - now) / 2)
    delay = max(MIN_CSR_INTERVAL, delay)
    return dataclasses.replace(state, failures=failures, retry_at=now + delay, last_error=error)


def next_action(state: RotationState, now: float) -> Renew | Wait:
    due = state.next_attempt()
    if due is not None and now < due:
        return Wait(due)
    if state.failures:
        return Renew(f"retry after {state.failures} failure(s): {state.last_error}")
    if not state.has_cert:
        return Renew("no certificate yet")
    if state.expires is not None and now >= state.expires:
        return Renew("certificate expired")
    return Renew("rotation time reached")
