"""Runs the agent's parts as structured tasks: a part that fails is restarted with backoff and
its failure recorded (what ``vmagent status`` shows); it never takes the others down."""

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

log = logging.getLogger("vmagent")

Part = Callable[[], Awaitable[None]]
STABLE_SECONDS = 60.0  # a part that ran this long starts its backoff afresh when it fails


@dataclass
class PartState:
    state: str = "starting"  # starting, running, restarting, stopped
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
    def __init__(self, rng: random.Random | None = None) -> None:
        self.parts: dict[str, PartState] = {}
        self._rng = rng or random.Random()

    async def run(self, parts: Mapping[str, Part]) -> None:
        """Run every part until cancelled."""
        async with TaskGroup() as group:
            for name, part in parts.items():
                self.parts[name] = PartState()
                group.create_task(self._keep(name, part), name=f"vmagent:{name}")

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
