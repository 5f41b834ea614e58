"""When to renew the workload certificate: a pure state machine, time and randomness passed in.

Istio's rule (``secretcache.go``): rotate when ``ratio`` of the lifetime has passed, with
``ratio = clamp(SECRET_GRACE_PERIOD_RATIO + U[-1,1) x SECRET_GRACE_PERIOD_RATIO_JITTER, 0, 1)``,
measured from the time the cert was received. A failed renewal is retried with exponential
backoff (never sleeping past half of what is left of the cert) for as long as it takes; the old
cert stays in service meanwhile.
"""

from __future__ import annotations

import dataclasses

RETRY_BASE = 1.0  # seconds
RETRY_CAP = 60.0
RETRY_JITTER = 0.1
MIN_RETRY = 0.2


@dataclasses.dataclass(frozen=True)
class Schedule:
    ratio: float = 0.5
    jitter: float = 0.01
    retry_base: float = RETRY_BASE
    retry_cap: float = RETRY_CAP


@dataclasses.dataclass(frozen=True)
class RotationState:
    created: float | None = None  # current cert: received at
    expires: float | None = None  # current cert: NotAfter
    rotate_at: float | None = None
    failures: int = 0
    retry_at: float | None = None
    last_error: str = ""

    @property
    def has_cert(self) -> bool:
        return self.expires is not None

    def next_attempt(self) -> float | None:
        """When the next renewal is due (None: right away)."""
        return self.retry_at if self.failures else self.rotate_at


@dataclasses.dataclass(frozen=True)
class Renew:
    reason: str


@dataclasses.dataclass(frozen=True)
class Wait:
    until: float


def rotation_time(created: float, expires: float, schedule: Schedule, r: float) -> float:
    """``r`` in [-1, 1) picks the jitter."""
    ratio = min(1.0, max(0.0, schedule.ratio + r * schedule.jitter))
    return expires - ratio * (expires - created)


def on_issued(
    state: RotationState, created: float, expires: float, schedule: Schedule, r: float
) -> RotationState:
    return RotationState(
        created=created,
        expires=expires,
        rotate_at=rotation_time(created, expires, schedule, r),
        last_error="",
    )


def retry_delay(failures: int, schedule: Schedule, r: float) -> float:
    """Exponential backoff for the ``failures``-th consecutive failure, ``r`` in [-1, 1)."""
    base = min(schedule.retry_cap, schedule.retry_base * 2.0 ** max(0, failures - 1))
    return base * (1.0 + r * RETRY_JITTER)


def on_failure(
    state: RotationState, error: str, now: float, schedule: Schedule, r: float
) -> RotationState:
    failures = state.failures + 1
    delay = retry_delay(failures, schedule, r)
    if state.expires is not None and state.expires > now:
        delay = min(delay, max(MIN_RETRY, (state.expires - now) / 2))
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
