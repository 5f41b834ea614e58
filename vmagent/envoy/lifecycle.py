"""The Envoy process's life as the agent records it (pure: every time is passed in).

States: ``starting`` (spawned, not LIVE yet) -> ``live`` -> (exit) ``backoff`` -> ``starting``
...; on stop ``draining`` -> ``stopped``. A crash is restarted after an exponential backoff
(vmagent.backoff: 1 s doubling to a 30 s cap, jittered); a run that lasted STABLE_SECONDS
starts the backoff afresh. Istio's agent instead exits with Envoy and leaves the restart to
systemd, losing DNS and health meanwhile (istio/istio#31395)."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from vmagent.backoff import backoff_delay


def describe_exit(returncode: int) -> int | str:
    """An exit code as an int, a death by signal as its name (``-9`` -> ``"SIGKILL"``)."""
    if returncode >= 0:
        return returncode
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def rfc3339(wall: float) -> str:
    """UTC RFC 3339 with millisecond precision: ``2026-11-29T12:00:00.123Z``."""
    moment = datetime.fromtimestamp(wall, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class RestartPolicy:
    """Seconds. ``base`` doubles per consecutive crash up to ``cap``."""

    base: float = 1.0
    cap: float = 30.0
    stable_seconds: float = 60.0


@dataclass
class Lifecycle:
    """Mutable record owned by one supervisor. ``now`` is a monotonic clock, ``wall`` is
    ``time.time()``."""

    policy: RestartPolicy = RestartPolicy()
    state: str = "stopped"
    pid: int | None = None
    restarts: int = 0
    failures: int = 0  # crashes since the last stable run
    last_exit: int | str | None = None
    started_wall: float | None = None
    started_now: float | None = None
    stopping: bool = False

    def started(self, pid: int, now: float, wall: float) -> None:
        self.state = "starting"
        self.pid = pid
        self.started_now = now
        self.started_wall = wall

    def became_live(self) -> None:
        if self.state == "starting":
            self.state = "live"

    def exited(self, returncode: int, now: float, fraction: float) -> float | None:
        """Record an exit; the delay (seconds) before the restart, or None when stopping.
        ``fraction`` in [0, 1) picks the jitter."""
        self.last_exit = describe_exit(returncode)
        self.pid = None
        if self.stopping:
            self.state = "stopped"
            return None
        ran = now - self.started_now if self.started_now is not None else 0.0
        if ran >= self.policy.stable_seconds:
            self.failures = 0
        self.failures += 1
        self.restarts += 1
        self.state = "backoff"
        return backoff_delay(self.failures, fraction, self.policy.base, self.policy.cap)

    def stop_requested(self) -> None:
        self.stopping = True
        self.state = "draining" if self.pid is not None else "stopped"

    def snapshot(self, now: float) -> dict[str, Any]:
        """The ``envoy`` part of ``/status``: pid, state, restarts, last_exit, started
        (RFC 3339 UTC, of the current process) and uptime_seconds."""
        running = self.pid is not None and self.started_now is not None
        return {
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "started": rfc3339(self.started_wall)
            if running and self.started_wall is not None
            else None,
            "uptime_seconds": round(now - self.started_now, 3)
            if running and self.started_now is not None
            else None,
        }
