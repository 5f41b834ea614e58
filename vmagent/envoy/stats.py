"""Reading Envoy's admin answers (pure: text in, facts out).

- ``/stats`` text: ``name: value`` lines; counters and gauges are integers, the rest (text
  stats such as ``version_text: ""``, histograms) is skipped.
- ``/server_info`` JSON: ``state`` is LIVE, DRAINING, PRE_INITIALIZING or INITIALIZING.
- LIVE, as Istio's readiness probe (``pilot/cmd/pilot-agent/status/ready/probe.go``) sees it:
  server LIVE, ``cluster_manager.cds.update_success > 0`` and
  ``listener_manager.lds.update_success > 0``.
- Active connections for ``EXIT_ON_ZERO_ACTIVE_CONNECTIONS`` (``pkg/envoy/agent.go``
  ``activeProxyConnections``): the sum of ``listener.*.downstream_cx_active`` leaving out
  per-worker copies, internal listeners, the admin listener and the agent's own 15021/15090.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

CDS_SUCCESS = "cluster_manager.cds.update_success"
CDS_REJECTED = "cluster_manager.cds.update_rejected"
LDS_SUCCESS = "listener_manager.lds.update_success"
LDS_REJECTED = "listener_manager.lds.update_rejected"
LIVE = "LIVE"
# The filters the shell asks for (Envoy applies them as RE2 regular expressions).
UPDATE_STATS_FILTER = r"^(cluster_manager\.cds|listener_manager\.lds)\.update_(success|rejected)$"
ACTIVE_CONNECTIONS_FILTER = "downstream_cx_active$"

_LINE = re.compile(r"^([^:\s][^:]*):\s*(-?\d+)\s*$")


def parse_stats(text: str) -> dict[str, int]:
    """Integer stats from ``/stats`` text output; other lines are ignored."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match:
            stats[match.group(1)] = int(match.group(2))
    return stats


def server_state(server_info: str) -> str:
    """The ``state`` of a ``/server_info`` answer; ValueError if the text has none."""
    try:
        document = json.loads(server_info)
    except json.JSONDecodeError as exc:
        raise ValueError(f"/server_info: not JSON: {exc}") from None
    state = document.get("state") if isinstance(document, dict) else None
    if not isinstance(state, str):
        raise ValueError("/server_info: no state")
    return state


def not_live_reasons(state: str, stats: Mapping[str, int]) -> list[str]:
    """Why Envoy is not LIVE yet (empty when it is), worded like Istio's probe."""
    reasons: list[str] = []
    if state != LIVE:
        reasons.append(f"Envoy server state is {state}, not {LIVE}")
    cds, lds = stats.get(CDS_SUCCESS, 0), stats.get(LDS_SUCCESS, 0)
    counts = (
        f"cds updates: {cds} successful, {stats.get(CDS_REJECTED, 0)} rejected; "
        f"lds updates: {lds} successful, {stats.get(LDS_REJECTED, 0)} rejected"
    )
    if cds == 0 and lds == 0:
        reasons.append(f"Envoy has no config from the control plane yet ({counts})")
    elif cds == 0 or lds == 0:
        rejected = stats.get(CDS_REJECTED, 0) + stats.get(LDS_REJECTED, 0)
        what = "rejected" if rejected else "not fully received"
        reasons.append(f"Envoy config {what} ({counts})")
    return reasons


def agent_listener_ports(ports: Iterable[int]) -> tuple[str, ...]:
    """Name suffixes (``_15021``) of the bootstrap's own listeners, whatever their address."""
    return tuple(f"_{port}" for port in ports)


def active_connections(stats: Mapping[str, int], own_suffixes: Iterable[str]) -> int | None:
    """Open downstream connections on the workload's listeners; None when Envoy reported no
    such stat at all (Istio then stops waiting: nothing to drain, or stats disabled)."""
    suffixes = tuple(own_suffixes)
    found = False
    total = 0
    for name, value in stats.items():
        if not name.endswith(".downstream_cx_active"):
            continue
        found = True
        if not name.startswith("listener.") or ".worker_" in name:
            continue
        listener = name[len("listener.") : -len(".downstream_cx_active")]
        if listener.startswith(("admin", "envoy_internal_")) or listener.endswith(suffixes):
            continue
        total += value
    return total if found else None
