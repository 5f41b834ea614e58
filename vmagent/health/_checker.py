"""The health-check loop: delay, probe at once, then every period; report transitions."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ._probers import run_probe
from ._spec import ProbeSpec
from ._state import HealthEvent, HealthState, ProbeResult, Thresholds

__all__ = ["EventCallback", "HealthChecker", "HealthStatus", "PreCheck"]

EventCallback = Callable[[HealthEvent], Awaitable[None] | None]
"""Called with each transition; may be a plain function or a coroutine function."""

PreCheck = Callable[[], Awaitable[ProbeResult]]
"""A check run before the application probe each round (Istio runs Envoy's readiness first);
a failing pre-check makes the round unhealthy with its message and skips the app probe."""


@dataclass(frozen=True)
class HealthStatus:
    """A snapshot for a status page."""

    probe: str
    state: HealthState
    last_result: ProbeResult | None
    last_event: HealthEvent | None
    probes: int
    consecutive_successes: int
    consecutive_failures: int

    def as_dict(self) -> dict[str, object]:
        result = self.last_result
        return {
            "probe": self.probe,
            "state": self.state.value,
            "probes": self.probes,
            "lastResult": None
            if result is None
            else {"healthy": result.healthy, "message": result.message},
            "lastEvent": None
            if self.last_event is None
            else {"healthy": self.last_event.healthy, "message": self.last_event.message},
            "consecutiveSuccesses": self.consecutive_successes,
            "consecutiveFailures": self.consecutive_failures,
        }


class HealthChecker:
    """Runs a readiness probe forever and calls ``on_event`` on every health transition.

    ``await checker.run()`` sleeps ``initialDelaySeconds``, probes at once, then every
    ``periodSeconds`` (measured from the start of one round to the next, like Go's ticker; a
    round that overruns skips the ticks it missed). Cancel the task to stop it: an in-flight
    probe is abandoned cleanly (sockets closed, exec process groups killed). An exception from
    ``on_event`` ends ``run()`` with that exception, for the owner to handle.
    """

    def __init__(
        self,
        spec: ProbeSpec,
        on_event: EventCallback,
        *,
        pre_checks: Sequence[PreCheck] = (),
    ) -> None:
        self.spec = spec
        self._on_event = on_event
        self._pre_checks = tuple(pre_checks)
        self._thresholds = Thresholds(spec.success_threshold, spec.failure_threshold)
        self._last_result: ProbeResult | None = None
        self._last_event: HealthEvent | None = None
        self._probes = 0

    @property
    def state(self) -> HealthState:
        return self._thresholds.state

    @property
    def last_result(self) -> ProbeResult | None:
        return self._last_result

    @property
    def last_event(self) -> HealthEvent | None:
        """The last transition reported (what the control plane should currently believe)."""
        return self._last_event

    def status(self) -> HealthStatus:
        return HealthStatus(
            probe=self.spec.kind,
            state=self.state,
            last_result=self._last_result,
            last_event=self._last_event,
            probes=self._probes,
            consecutive_successes=self._thresholds.successes,
            consecutive_failures=self._thresholds.failures,
        )

    async def check_once(self) -> HealthEvent | None:
        """One round: pre-checks, probe, state machine, callback. Returns the event, if any."""
        result = await self._probe()
        self._last_result = result
        self._probes += 1
        event = self._thresholds.observe(result)
        if event is not None:
            self._last_event = event
            outcome = self._on_event(event)
            if inspect.isawaitable(outcome):
                await outcome
        return event

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.spec.initial_delay_seconds > 0:
            await asyncio.sleep(self.spec.initial_delay_seconds)
        period = self.spec.period_seconds
        next_round = loop.time()
        while True:
            await self.check_once()
            next_round += period
            now = loop.time()
            if next_round < now:  # overran: skip missed ticks
                next_round += period * ((now - next_round) // period + 1)
            await asyncio.sleep(next_round - now)

    async def _probe(self) -> ProbeResult:
        for check in self._pre_checks:
            result = await check()
            if not result.healthy:
                return result
        return await run_probe(self.spec)
