"""``/status?v=1``: the agent's state as a stable schema (docs/status.md), and its verdict.

Pure: the raw state document (:meth:`vmagent.agent.Agent.state`, whose parts mix epoch floats,
ISO strings, camelCase and snake_case) and ``now`` (wall-clock seconds) in; out a document
with one naming style (snake_case), one time format (RFC 3339 UTC strings, ``...Z``, or null),
durations in seconds (``*_seconds``), sizes in bytes (``*_bytes``), an overall ``state``
(``healthy``, ``degraded`` or ``starting``) and ``problems`` in words that say what to do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

SCHEMA_VERSION = 1
HEALTHY, DEGRADED, STARTING = "healthy", "degraded", "starting"
STARTING_GRACE_SECONDS = 60.0  # not ready this soon after start: "starting", not "degraded"
CERT_WARN_SECONDS = 3600.0  # a certificate this close to expiry is a problem


def rfc3339(value: Any) -> str | None:
    """An epoch float/int or an ISO 8601 string -> ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC); None
    stays None. ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        moment = datetime.fromtimestamp(float(value), tz=timezone.utc)
    elif isinstance(value, str):
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        moment = moment.astimezone(timezone.utc)
    else:
        raise ValueError(f"not a time: {value!r}")
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def epoch(value: str | None) -> float | None:
    """An RFC 3339 string of this schema back to epoch seconds (None stays None)."""
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def workload_entry_name(group: str, ips: Sequence[str], namespace: str, network: str) -> str:
    """Istio's ``autoregisteredWorkloadEntryName`` (pilot/pkg/autoregistration): group, first
    IP (``:`` -> ``-``), network when set, joined by ``-``, the last 253 characters; empty
    without a group, IP or namespace (then nothing is registered)."""
    if not group or not ips or not namespace:
        return ""
    parts = [group, ips[0].replace(":", "-")]
    if network:
        parts.append(network)
    return "-".join(parts)[-253:]


def _result(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        return None
    return {"healthy": bool(value.get("healthy")), "message": value.get("message") or ""}


def _identity(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    return {
        "source": raw.get("source"),
        "source_reason": raw.get("source_reason"),
        "spiffe_id": raw.get("spiffe_id"),
        "serial": raw.get("serial"),
        "cert_not_after": rfc3339(raw.get("not_after")),
        "next_rotation_at": rfc3339(raw.get("next_rotation")),
        "last_attempt_at": rfc3339(raw.get("last_attempt")),
        "last_error": raw.get("last_error"),
        "failures": int(raw.get("failures") or 0),
    }


def _health(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    return {
        "probe": raw.get("probe"),
        "state": raw.get("state"),
        "probes": int(raw.get("probes") or 0),
        "last_result": _result(raw.get("lastResult")),
        "last_event": _result(raw.get("lastEvent")),
        "consecutive_successes": int(raw.get("consecutiveSuccesses") or 0),
        "consecutive_failures": int(raw.get("consecutiveFailures") or 0),
    }


def _control_plane(raw: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "address": raw.get("address"),
        "kind": raw.get("kind"),
        "connected": bool(raw.get("connected")),
        "connected_since": rfc3339(raw.get("connected_since")),
        "streams": int(raw.get("streams") or 0),
        "last_error": raw.get("last_error"),
        "pushes": int(raw.get("name_table_updates") or 0),
        "name_table_version": raw.get("name_table_version"),
        "nacks": int(raw.get("nacks") or 0),
        "last_nack": raw.get("last_nack"),
        "workload_entry": node.get("workload_entry") or None,
        "reported_health": _result(raw.get("health")),
    }


def _envoy(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    process = raw.get("process") or {}
    return {
        "state": raw.get("state"),
        "live": bool(raw.get("live")),
        "not_ready": raw.get("not_ready"),
        "pid": raw.get("pid"),
        "started_at": rfc3339(raw.get("started")),
        "uptime_seconds": raw.get("uptime_seconds"),
        "restarts": int(raw.get("restarts") or 0),
        "last_exit": raw.get("last_exit"),
        "version": raw.get("version"),
        "rss_bytes": process.get("rss_bytes"),
        "cpu_seconds": process.get("cpu_seconds"),
    }


def _dns(raw: Mapping[str, Any], table: Mapping[str, Any], now: float, up: float) -> dict[str, Any]:
    counters = raw.get("counters") or {}
    queries = {k: int(v) for k, v in (counters.get("queries") or {}).items()}
    total = sum(queries.values())
    looked_up = queries.get("cache", 0) + queries.get("upstream", 0) + queries.get("stale", 0)
    updated = counters.get("last_table_update")
    latency = counters.get("upstream_latency") or {}
    return {
        "ready": bool(raw.get("ready")),
        "listen": list(raw.get("listening") or []),
        "upstreams": list(raw.get("upstreams") or []),
        "search": list(raw.get("search") or []),
        "table": {
            "names": int(table.get("names") or 0),
            "entries": int(table.get("entries") or 0),
            "version": table.get("version"),
            "updated_at": rfc3339(updated),
            "age_seconds": None if updated is None else round(max(0.0, now - updated), 3),
        },
        "cache_entries": int(raw.get("cache_entries") or 0),
        "queries": queries,
        "queries_total": total,
        # Average since the agent started; `vmagent status --watch` shows the current rate.
        "queries_per_second": round(total / up, 3) if up > 0 else 0.0,
        "cache_hit_ratio": round(queries.get("cache", 0) / looked_up, 4) if looked_up else None,
        "upstream_failures": int(counters.get("upstream_failures") or 0),
        "dropped": int(counters.get("dropped") or 0),
        "upstream_latency": {
            "buckets": dict(latency.get("buckets") or {}),
            "sum_seconds": float(latency.get("sum") or 0.0),
        },
    }


def _capture(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if raw is None:  # an agent older than this key
        return None
    return {
        "cluster_env_asks": bool(raw.get("asked")),
        "wanted": bool(raw.get("wanted")),
        "applied": bool(raw.get("applied")),
        "by": raw.get("by"),
        "dns_captured": bool(raw.get("dns_captured")),
        "dns_redirect": raw.get("dns_redirect"),
        "dns_redirect_since": rfc3339(raw.get("dns_redirect_since")),
        "last_error": raw.get("last_error"),
    }


def _parts(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "state": part.get("state"),
            "restarts": int(part.get("restarts") or 0),
            "last_error": part.get("last_error"),
            "last_failure_at": rfc3339(part.get("last_failure")),
        }
        for name, part in sorted(raw.items())
    }


def status_v1(doc: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The raw state ``doc`` as schema version 1 (docs/status.md)."""
    started = float(doc.get("started") or now)
    node = doc.get("node") or {}
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": rfc3339(now),
        "version": doc.get("version"),
        "node": {"id": node.get("id"), "ips": list(node.get("ips") or [])},
        "started_at": rfc3339(started),
        "uptime_seconds": round(max(0.0, now - started), 3),
        "ready": bool(doc.get("ready")),
        "not_ready": list(doc.get("not_ready") or []),
        "identity": _identity(doc.get("identity")),
        "control_plane": _control_plane(doc.get("xds") or {}, node),
        "health": _health(doc.get("health")),
        "envoy": _envoy(doc.get("envoy")),
        "dns": _dns(doc.get("dns") or {}, doc.get("name_table") or {}, now, now - started),
        "capture": _capture(doc.get("capture")),
        "parts": _parts(doc.get("parts") or {}),
    }
    found = problems(out, now)
    out["problems"] = found
    if not found:
        out["state"] = HEALTHY
    elif not out["ready"] and out["uptime_seconds"] < STARTING_GRACE_SECONDS:
        out["state"] = STARTING
    else:
        out["state"] = DEGRADED
    return out


def _problem(part: str, message: str, action: str) -> dict[str, str]:
    return {"part": part, "message": message, "action": action}


# How the agent's health checker reports that Envoy, checked before the application probe,
# is not ready (vmagent/agent_envoy.py, DataPlane.not_ready_reason).
ENVOY_NOT_READY = "Envoy not ready"


def problems(view: Mapping[str, Any], now: float) -> list[dict[str, str]]:
    """What is wrong, each as ``{"part", "message", "action"}`` (empty: all healthy)."""
    found: list[dict[str, str]] = []
    identity = view.get("identity")
    not_after = epoch(identity.get("cert_not_after")) if identity else None
    if identity is None or not_after is None:
        error = (identity or {}).get("last_error")
        found.append(_problem(
            "identity",
            "no workload certificate" + (f": {error}" if error else ""),
            "check the credential (token file or cloud identity) and that the CA address is"
            " reachable; see `vmagent identity show`",
        ))  # fmt: skip
    elif not_after <= now:
        found.append(_problem(
            "identity", "the workload certificate has expired",
            "check the CA address and credential; the agent keeps retrying the CSR",
        ))  # fmt: skip
    elif not_after - now < CERT_WARN_SECONDS and identity.get("last_error"):
        found.append(_problem(
            "identity", f"certificate expires soon and rotation fails: {identity['last_error']}",
            "fix the CA connection before the certificate expires",
        ))  # fmt: skip
    plane = view.get("control_plane") or {}
    if not plane.get("connected"):
        error = plane.get("last_error")
        found.append(_problem(
            "control_plane",
            f"not connected to {plane.get('address')}" + (f": {error}" if error else ""),
            "check that istiod (discoveryAddress) is reachable from this VM and that"
            " ISTIOD_SAN and the root certificate match it",
        ))  # fmt: skip
    health = view.get("health")
    if health is not None and health.get("state") == "unhealthy":
        result = health.get("last_result") or {}
        message = str(result.get("message") or "unhealthy")
        if message.startswith(ENVOY_NOT_READY):
            # The agent checks Envoy before the application (reference §4.2): the app may
            # be fine; sending the user to it would be wrong.
            found.append(_problem(
                "health",
                "the readiness probe cannot get through yet: Envoy is not ready"
                f" ({message.removeprefix(ENVOY_NOT_READY).lstrip(': ')})",
                "wait for Envoy (it needs its certificate and configuration from the control"
                " plane; see the envoy and control_plane problems); the application's probe"
                " runs once it is ready",
            ))  # fmt: skip
        else:
            found.append(_problem(
                "health", f"the readiness probe fails: {message}",
                "check the application on this VM; the mesh sends it no traffic until it"
                " passes",
            ))  # fmt: skip
    envoy = view.get("envoy")
    if envoy is not None and not envoy.get("live"):
        found.append(_problem(
            "envoy", f"Envoy is not LIVE ({envoy.get('not_ready') or envoy.get('state')})",
            "see `journalctl -u vmagent` for Envoy's output; the agent restarts it",
        ))  # fmt: skip
    dns = view.get("dns") or {}
    if not dns.get("ready"):
        found.append(_problem(
            "dns", "the DNS proxy has no name table yet",
            "it arrives from the control plane once connected",
        ))  # fmt: skip
    found += capture_problems(view.get("capture"))
    for name, part in (view.get("parts") or {}).items():
        if part.get("state") in ("restarting", "failed"):
            found.append(_problem(
                name, f"{name} is {part['state']}: {part.get('last_error')}",
                "see `journalctl -u vmagent`; the agent retries with backoff",
            ))  # fmt: skip
    reported = {p["part"] for p in found}
    for reason in view.get("not_ready") or []:
        if not any(_mentions(reason, part) for part in reported):
            found.append(_problem("readiness", reason, "see the sections above"))
    return found


def capture_problems(capture: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """Capture's problems (docs/capture.md): wanted but not in place; the DNS redirect dropped
    by the fail-open watchdog (istio/istio#33454: it must never point at a dead agent); an
    error the agent or the watchdog met. Capture not wanted is no problem."""
    if capture is None:
        return []
    error = capture.get("last_error")
    if capture.get("wanted") and not capture.get("applied"):
        return [_problem(
            "capture",
            "traffic capture is wanted (cluster.env) but not applied"
            + (f": {error}" if error else ""),
            "the applications' traffic and DNS bypass the mesh: restart the agent"
            " (`systemctl restart vmagent`: it applies capture itself), or run"
            " `sudo vmagent capture apply`",
        )]  # fmt: skip
    found: list[dict[str, str]] = []
    if capture.get("applied") and capture.get("dns_redirect") == "off":
        found.append(_problem(
            "capture",
            "the DNS redirect was dropped by the fail-open watchdog (the agent's DNS port did"
            " not answer)",
            "DNS is answered by the host resolver; mesh names won't resolve until the agent's"
            " DNS proxy answers again (the watchdog then restores the redirect within seconds);"
            " see `journalctl -u vmagent` and capture-watch.log in VMAGENT_RUN_DIR",
        ))  # fmt: skip
    if capture.get("applied") and error:
        found.append(_problem(
            "capture", f"capture: {error}",
            "see capture-watch.log in VMAGENT_RUN_DIR; `sudo vmagent capture apply` re-applies"
            " the rules",
        ))  # fmt: skip
    return found


def _mentions(reason: str, part: str) -> bool:
    words = {
        "identity": "certificate",
        "control_plane": "control plane",
        "dns": "name table",
        "envoy": "envoy",
    }
    return words.get(part, part) in reason.lower()
