"""``/status?v=1``: one naming style and one time format, whatever the parts report, and a
verdict with problems that say what to do."""

from __future__ import annotations

import json
import re
from typing import Any

from vmagent.status import route
from vmagent.status.render import render
from vmagent.status.view import rfc3339, status_v1, workload_entry_name

NOW = 1_800_000_000.0
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def raw_state(**changes: Any) -> dict[str, Any]:
    """A state document as Agent.state() makes it: epoch floats, ISO strings, camelCase."""
    doc: dict[str, Any] = {
        "version": "0.1.0",
        "node": {"id": "sidecar~10.0.0.5~vm.ns~ns.svc.cluster.local", "ips": ["10.0.0.5"],
                 "workload_entry": "web-10.0.0.5"},
        "started": NOW - 600,
        "ready": True,
        "not_ready": [],
        "identity": {
            "source": "jwt", "source_reason": "token file", "spiffe_id": "spiffe://td/ns/a/sa/b",
            "serial": "ab", "not_after": "2027-01-16T08:00:00Z",
            "next_rotation": "2027-01-15T20:00:00Z", "last_attempt": "2027-01-14T08:00:00Z",
            "last_error": None, "failures": 0,
        },
        "xds": {
            "address": "istiod:15012", "kind": "sotw", "connected": True, "connected_once": True,
            "connected_since": NOW - 500, "streams": 1, "last_error": None,
            "name_table_version": "v3", "name_table_updates": 3, "nacks": 0, "last_nack": None,
            "health": {"healthy": True, "message": ""},
        },
        "dns": {
            "ready": True, "upstreams": ["10.0.0.2:53"], "search": [],
            "listening": ["127.0.0.1:15053"], "cache_entries": 7,
            "counters": {
                "queries": {"table": 10, "cache": 30, "upstream": 10, "stale": 0, "error": 0},
                "dropped": 0, "upstream_failures": 0,
                "upstream_latency": {"buckets": {"0.001": 4, "+Inf": 6}, "sum": 0.5},
                "table_names": 4, "table_entries": 2, "last_table_update": NOW - 60,
            },
        },
        "health": {
            "probe": "httpGet", "state": "healthy", "probes": 9,
            "lastResult": {"healthy": True, "message": ""}, "lastEvent": None,
            "consecutiveSuccesses": 9, "consecutiveFailures": 0,
        },
        "envoy": None,
        "xds_proxy": None,
        "parts": {"identity": {"state": "running", "restarts": 0, "last_error": None,
                               "last_failure": None}},
        "name_table": {"entries": 2, "names": 4, "version": "v3"},
    }  # fmt: skip
    doc.update(changes)
    return doc


def keys_and_times(value: Any, path: str = "") -> list[str]:
    bad: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            free = path.endswith((".queries", ".buckets", ".parts"))
            if not free and not re.match(r"^[a-z][a-z0-9_]*$", key):
                bad.append(f"{path}.{key}")
            timed = key.endswith(("_at", "_since", "_after")) and item is not None
            if timed and not (isinstance(item, str) and RFC3339.match(item)):
                bad.append(f"{path}.{key}={item!r}")
            bad += keys_and_times(item, f"{path}.{key}")
    elif isinstance(value, list):
        for item in value:
            bad += keys_and_times(item, path)
    return bad


def test_one_naming_style_and_one_time_format() -> None:
    view = status_v1(raw_state(), NOW)
    assert keys_and_times(view) == []
    assert view["state"] == "healthy" and view["problems"] == []
    assert view["control_plane"]["connected_since"] == rfc3339(NOW - 500)
    assert view["identity"]["cert_not_after"] == "2027-01-16T08:00:00.000Z"
    assert view["health"]["consecutive_successes"] == 9
    assert view["health"]["last_result"] == {"healthy": True, "message": ""}
    assert view["dns"]["table"]["age_seconds"] == 60.0
    assert view["dns"]["cache_hit_ratio"] == 0.75  # 30 cache / (30 + 10 upstream)
    assert view["dns"]["queries_per_second"] == round(50 / 600, 3)
    assert view["control_plane"]["workload_entry"] == "web-10.0.0.5"


def test_failing_probe_is_degraded_and_says_what_to_do() -> None:
    health = raw_state()["health"] | {
        "state": "unhealthy", "lastResult": {"healthy": False, "message": "HTTP 503"},
    }  # fmt: skip
    view = status_v1(raw_state(health=health), NOW)
    assert view["state"] == "degraded"
    assert [p["part"] for p in view["problems"]] == ["health"]
    assert "HTTP 503" in view["problems"][0]["message"]
    text = render(view)
    assert "DEGRADED" in text and "what to do: check the application" in text


def test_starting_then_degraded_when_not_ready_too_long() -> None:
    doc = raw_state(ready=False, not_ready=["control plane not connected yet"], identity=None)
    doc["xds"] = doc["xds"] | {"connected": False, "last_error": "connection refused"}
    doc["started"] = NOW - 5
    starting = status_v1(doc, NOW)
    assert starting["state"] == "starting"
    parts = {p["part"] for p in starting["problems"]}
    assert parts == {"identity", "control_plane"}  # the reason is not repeated
    assert "connection refused" in render(starting)
    doc["started"] = NOW - 3600
    assert status_v1(doc, NOW)["state"] == "degraded"


def test_envoy_not_live_is_a_problem() -> None:
    envoy = {
        "pid": 42, "state": "starting", "restarts": 2, "last_exit": "exit 1",
        "started": "2027-01-14T08:00:00.000Z", "uptime_seconds": 3.0, "live": False,
        "not_ready": "server state PRE_INITIALIZING", "version": "1.30",
        "process": {"rss_bytes": 50 * 1048576, "cpu_seconds": 1.0},
    }  # fmt: skip
    view = status_v1(raw_state(envoy=envoy), NOW)
    assert view["envoy"]["rss_bytes"] == 50 * 1048576 and view["envoy"]["restarts"] == 2
    assert [p["part"] for p in view["problems"]] == ["envoy"]
    assert "50.0 MiB" in render(view)


def test_workload_entry_name_as_istio_makes_it() -> None:
    assert workload_entry_name("web", ["10.0.0.5"], "ns", "") == "web-10.0.0.5"
    assert workload_entry_name("web", ["fd00::5"], "ns", "net1") == "web-fd00--5-net1"
    assert workload_entry_name("", ["10.0.0.5"], "ns", "") == ""
    assert len(workload_entry_name("g" * 300, ["10.0.0.5"], "ns", "")) == 253


def test_route_serves_the_versioned_view_and_keeps_the_raw_one() -> None:
    state = raw_state()
    code, kind, body = route("GET", "/status?v=1", lambda: state, NOW)
    assert (code, kind) == (200, "application/json")
    assert json.loads(body) == json.loads(json.dumps(status_v1(state, NOW)))
    raw = json.loads(route("GET", "/status", lambda: state, NOW)[2])
    assert "schema_version" not in raw and raw["health"]["consecutiveSuccesses"] == 9
