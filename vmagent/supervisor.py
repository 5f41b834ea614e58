"""Runs the agent's parts as structured tasks: a part that fails is restarted with backoff and
its failure recorded (what ``vmagent status`` shows); it never takes the others down.

Except for permanent misconfiguration (:class:`vmagent.config.ConfigError`, or whatever
``permanent`` names): no retry can fix it, so the part is marked ``failed``, every part is
stopped and :meth:`Supervisor.run` raises that error (``vmagent run`` then exits 2)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vmagent._compat import TaskGroup
from vmagent.backoff import backoff_delay
from vmagent.config import ConfigError

log = logging.getLogger("vmagent")

Part = Callable[[], Awaitable[None]]
STABLE_SECONDS = 60.0  # a part that ran this long starts its backoff afresh when it fails


@dataclass
class PartState:
    state: str = "starting"  # starting, running, restarting, stopped, failed
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    last_failure: float | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_failure": self.last_failure,
        }


class Supervisor:
    def __init__(
        self,
        rng: random.Random | None = None,
        permanent: tuple[type[Exception], ...] = (ConfigError,),
    ) -> None:
        self.parts: dict[str, PartState] = {}
        self.fatal: Exception | None = None  # the permanent error that stopped everything
        self._rng = rng or random.Random()
        self._permanent = permanent

    async def run(self, parts: Mapping[str, Part]) -> None:
        """Run every part until cancelled; raises the first permanent error (after stopping
        the other parts)."""
        try:
            async with TaskGroup() as group:
                for name, part in parts.items():
                    self.parts[name] = PartState()
                    group.create_task(self._keep(name, part), name=f"vmagent:{name}")
        except BaseException:
            # The task group wraps a part's error in an exception group; surface it plainly.
            if self.fatal is not None:
                raise self.fatal from None
            raise

    async def _keep(self, name: str, part: Part) -> None:
        state = self.parts[name]
        while True:
            state.state = "running"
            started = time.monotonic()
            try:
                await part()
                state.state = "stopped"
                log.info("%s: finished", name)
                return
            except asyncio.CancelledError:
                state.state = "stopped"
                raise
            except self._permanent as exc:
                state.state = "failed"
                state.last_error = f"{type(exc).__name__}: {exc}"
                state.last_failure = time.time()
                log.error("%s: permanent configuration error, not retrying: %s", name, exc)
                if self.fatal is None:
                    self.fatal = exc
                raise
            except Exception as exc:
                if time.monotonic() - started >= STABLE_SECONDS:
                    state.failures = 0
                state.failures += 1
                state.restarts += 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                state.last_failure = time.time()
                state.state = "restarting"
                delay = backoff_delay(state.failures, self._rng.random())
                log.error("%s failed (%s); restarting in %.1fs", name, state.last_error, delay)
                await asyncio.sleep(delay)

    def snapshot(self) -> dict[str, Any]:
        return {name: state.snapshot() for name, state in self.parts.items()}
