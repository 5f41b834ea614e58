"""Prometheus metrics on the status port: ``/stats/prometheus``, names prefixed ``vmagent_``.

Nothing is counted twice: at each scrape
:func:`vmagent.status.metric_families.families` reads the counters the parts already
keep (the agent's raw state document, :meth:`vmagent.agent.Agent.state`) into
``prometheus_client`` metric families, served from a registry of the agent's own (no
module-level state). When Envoy runs, its admin ``/stats/prometheus`` follows the agent's, as
Istio's agent merges them on :15020 (pilot/cmd/pilot-agent/status/server.go, ``handleStats``:
``scrapeAndWriteAgentMetrics`` first, then Envoy's body; a failed Envoy scrape is logged and
the agent's metrics are still served)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

log = logging.getLogger("vmagent.status")

StateSource = Callable[[], Mapping[str, Any]]


class EnvoyAdmin(Protocol):
    """What is used of :class:`vmagent.envoy.admin.AdminClient` (not imported: Envoy's
    modules load only when Envoy runs)."""

    async def request(self, method: str, path: str) -> str: ...


class _Collector:
    """Reads the state at each scrape (``prometheus_client``'s custom-collector protocol)."""

    def __init__(self, state: StateSource, clock: Callable[[], float]) -> None:
        self._state = state
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        from vmagent.status.metric_families import families

        return families(self._state(), self._clock())


class AgentMetrics:
    """One agent's ``/stats/prometheus``. ``envoy()`` gives Envoy's admin client while Envoy
    is LIVE (None otherwise: no Envoy section)."""

    def __init__(
        self,
        state: StateSource,
        envoy: Callable[[], EnvoyAdmin | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._collector = _Collector(state, clock)
        self._registry: CollectorRegistry | None = None  # made at the first scrape
        self._envoy = envoy

    def agent_text(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self._collector)
        return generate_latest(self._registry)

    async def render(self) -> bytes:
        """The agent's metrics, then Envoy's (when it is LIVE), in the text format 0.0.4."""
        pieces = [self.agent_text()]
        admin = self._envoy() if self._envoy is not None else None
        if admin is not None:
            try:
                text = await admin.request("GET", "/stats/prometheus")
                pieces.append(text.encode() if text.endswith("\n") else (text + "\n").encode())
            except OSError as exc:  # AdminError is an OSError
                log.debug("metrics: Envoy's stats unavailable: %s", exc)
        return b"".join(pieces)
