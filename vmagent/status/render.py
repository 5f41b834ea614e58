"""``vmagent status``'s human output (pure: the ``/status?v=1`` document in, text out).

Sections: overall state, identity, control plane, health, Envoy, DNS, capture, then the
problems in words that say what to do. Times are shown as given (RFC 3339 UTC) with a
relative hint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmagent.status.view import epoch

WIDTH = 20  # label column


def _ago(when: str | None, now: float) -> str:
    """``when`` with how long ago (or how soon) it is, e.g. ``... (in 23h59m)``."""
    stamp = epoch(when)
    if stamp is None:
        return "-"
    delta = stamp - now
    return f"{when} ({'in ' + _duration(delta) if delta >= 0 else _duration(-delta) + ' ago'})"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value / 1048576:.1f} MiB"


def _text(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _section(title: str, rows: list[tuple[str, Any]]) -> list[str]:
    rows_text = (f"  {label + ':':<{WIDTH}} {_text(value)}" for label, value in rows)
    return [title, *rows_text, ""]


def _result(result: Mapping[str, Any] | None) -> str:
    if not result:
        return "-"
    state = "healthy" if result.get("healthy") else "unhealthy"
    return f"{state}: {result['message']}" if result.get("message") else state


def _capture(capture: Mapping[str, Any] | None, now: float) -> list[str]:
    """The Capture section: off (and why), or applied (by whom) and the DNS redirect."""
    if capture is None:
        return []
    if not capture.get("wanted") and not capture.get("applied"):
        why = (
            "VMAGENT_CAPTURE=false"
            if capture.get("cluster_env_asks")
            else "cluster.env asks for none"
        )
        return ["Capture", f"  off ({why})", ""]
    if not capture.get("dns_captured"):
        redirect = "not captured (ISTIO_META_DNS_CAPTURE is not true)"
    elif capture.get("dns_redirect") == "off":
        redirect = "off: dropped by the fail-open watchdog, since " + _ago(
            capture.get("dns_redirect_since"), now
        )
    else:
        redirect = capture.get("dns_redirect") or "unknown"
    applied = capture.get("applied")
    return _section("Capture", [
        ("applied", f"yes, by {capture.get('by')}" if applied else "no"),
        ("DNS redirect", redirect if applied else "-"),
        ("last error", capture.get("last_error")),
    ])  # fmt: skip


def render(view: Mapping[str, Any], qps: float | None = None) -> str:
    """The text for one ``/status?v=1`` document. ``qps``: the current query rate measured
    between two samples (``--watch``); else the average since start is shown."""
    now = epoch(view.get("generated_at")) or 0.0
    state = str(view.get("state", "unknown"))
    lines = [
        f"vmagent {view.get('version')}: {state.upper()}"
        + ("" if view.get("ready") else " (not ready)"),
        f"  {'node:':<{WIDTH}} {view['node'].get('id')}",
        f"  {'up since:':<{WIDTH}} {_ago(view.get('started_at'), now)}",
        "",
    ]
    identity = view.get("identity") or {}
    lines += _section("Identity", [
        ("source", identity.get("source")),
        ("SPIFFE ID", identity.get("spiffe_id")),
        ("cert not after", _ago(identity.get("cert_not_after"), now)),
        # Without a certificate the time is the next CSR attempt (a retry), not a rotation.
        ("next rotation" if identity.get("cert_not_after") else "next attempt",
            _ago(identity.get("next_rotation_at"), now)),
        ("last error", identity.get("last_error")),
    ])  # fmt: skip
    plane = view.get("control_plane") or {}
    health = view.get("health")
    lines += _section("Control plane", [
        ("address", plane.get("address")),
        ("connected", plane.get("connected")),
        ("connected since", _ago(plane.get("connected_since"), now)),
        ("pushes", f"{plane.get('pushes', 0)}, name table version "
            + _text(plane.get("name_table_version"))),
        ("WorkloadEntry", plane.get("workload_entry")),
        ("reported health", _result(plane.get("reported_health"))),
        ("probe", "none configured" if health is None else
            f"{health.get('probe')}: {health.get('state')}, last "
            f"{_result(health.get('last_result'))} ({health.get('probes')} rounds)"),
        ("last error", plane.get("last_error")),
    ])  # fmt: skip
    envoy = view.get("envoy")
    if envoy is None:
        lines += ["Envoy", "  not run by this agent (VMAGENT_ENVOY=false)", ""]
    else:
        uptime = envoy.get("uptime_seconds")
        lines += _section("Envoy", [
            ("state", f"{envoy.get('state')}, LIVE: {_text(envoy.get('live'))}"),
            ("pid", envoy.get("pid")),
            ("uptime", None if uptime is None else _duration(float(uptime))),
            ("restarts", envoy.get("restarts")),
            ("last exit", envoy.get("last_exit")),
            ("RSS", _bytes(envoy.get("rss_bytes"))),
        ])  # fmt: skip
    dns = view.get("dns") or {}
    table = dns.get("table") or {}
    ratio = dns.get("cache_hit_ratio")
    rate = qps if qps is not None else dns.get("queries_per_second", 0.0)
    lines += _section("DNS", [
        ("listening", dns.get("listen")),
        ("name table", f"{table.get('names', 0)} names, updated "
            f"{_ago(table.get('updated_at'), now)}"),
        ("upstreams", dns.get("upstreams")),
        ("cache", f"{dns.get('cache_entries', 0)} entries, hit ratio "
            + ("-" if ratio is None else f"{ratio:.0%}")),
        ("queries", f"{dns.get('queries_total', 0)} total, {rate:.1f}/s"
            + ("" if qps is not None else " (average since start)")),
        ("upstream failures", dns.get("upstream_failures")),
    ])  # fmt: skip
    lines += _capture(view.get("capture"), now)
    found = view.get("problems") or []
    if not found:
        lines.append("No problems.")
    else:
        lines.append("Problems")
        for problem in found:
            lines.append(f"  - {problem['part']}: {problem['message']}")
            lines.append(f"    what to do: {problem['action']}")
    return "\n".join(lines) + "\n"
