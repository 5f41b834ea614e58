"""Which readiness changes are worth a log line (pure: reasons in, message out).

The agent polls its own readiness (``/healthz/ready``'s reasons) and logs the first state,
every ready <-> not ready transition and, while not ready, every change of the reasons, so an
operator reading the journal sees when and why the VM stopped (or started) taking traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ReadinessLog:
    """``observe(reasons)`` returns a message when worth logging, else None. ``reasons`` is
    the list of why-not-ready strings (empty: ready)."""

    reasons: tuple[str, ...] | None = None  # None: nothing observed yet

    def observe(self, reasons: Sequence[str]) -> str | None:
        now = tuple(reasons)
        before, self.reasons = self.reasons, now
        if now == before:
            return None
        if not now:
            return "readiness: ready" + ("" if before is None else " (was not ready)")
        was = "" if before is None else " (was ready)" if not before else ""
        return f"readiness: not ready{was}: " + "; ".join(now)
