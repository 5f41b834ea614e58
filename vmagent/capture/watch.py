"""Pure core of the DNS fail-open watchdog: probe results in, switch decisions out.

The DNS redirect must never point at a dead agent (istio/istio#33454 left VMs without DNS).
The watchdog probes the agent's DNS port once a second; the redirect is switched off after
``down_after`` consecutive failed probes and on again after ``up_after`` successes.
"""

from __future__ import annotations

from dataclasses import dataclass

DOWN_AFTER = 2  # failed probes (1 s apart) before DNS capture is switched off
UP_AFTER = 1  # successful probes before it is switched on again


@dataclass
class FailOpen:
    """``live`` is the current DNS capture state (None: unknown, the first probe decides)."""

    live: bool | None
    down_after: int = DOWN_AFTER
    up_after: int = UP_AFTER
    _run: int = 0  # consecutive probes disagreeing with ``live``

    def observe(self, answered: bool) -> bool | None:
        """Record one probe; returns the new state when capture must switch, else None."""
        if self.live is None:
            self.live, self._run = answered, 0
            return answered
        if answered == self.live:
            self._run = 0
            return None
        self._run += 1
        if self._run >= (self.up_after if answered else self.down_after):
            self.live, self._run = answered, 0
            return answered
        return None
