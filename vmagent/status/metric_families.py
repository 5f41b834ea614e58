"""The agent's ``vmagent_*`` metric families (pure: the raw state document and ``now`` in).

Imported only at the first scrape (:mod:`vmagent.status.metrics`): ``prometheus_client`` is
~4.5 MB of RSS an agent nobody scrapes does not need (issue 7 §5)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from vmagent.status.view import epoch


def _gauge(name: str, doc: str, value: float, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value, unit=unit)


def _dns(dns: Mapping[str, Any], table: Mapping[str, Any], now: float) -> Iterator[Metric]:
    counters = dns.get("counters") or {}
    queries = CounterMetricFamily(
        "vmagent_dns_queries", "DNS queries answered, by outcome", labels=["outcome"]
    )
    for outcome, count in (counters.get("queries") or {}).items():
        queries.add_metric([outcome], float(count))
    yield queries
    yield CounterMetricFamily(
        "vmagent_dns_upstream_failures",
        "Forwarded queries the upstream servers did not answer",
        value=float(counters.get("upstream_failures") or 0),
    )
    yield CounterMetricFamily(
        "vmagent_dns_dropped",
        "Queries dropped (malformed)",
        value=float(counters.get("dropped") or 0),
    )
    latency = counters.get("upstream_latency") or {}
    running, buckets = 0.0, []
    for bound, count in (latency.get("buckets") or {}).items():  # per bucket -> cumulative
        running += float(count)
        buckets.append((bound, running))
    if buckets:
        yield HistogramMetricFamily(
            "vmagent_dns_upstream_latency_seconds",
            "Time for an upstream server to answer a forwarded query",
            buckets=buckets,
            sum_value=float(latency.get("sum") or 0.0),
        )
    yield _gauge(
        "vmagent_dns_cache_entries", "Entries in the DNS cache", dns.get("cache_entries") or 0
    )
    yield _gauge("vmagent_dns_table_names", "Names in the NDS name table", table.get("names") or 0)
    yield _gauge(
        "vmagent_dns_table_entries", "Entries in the NDS name table", table.get("entries") or 0
    )
    updated = counters.get("last_table_update")
    if updated is not None:
        yield _gauge(
            "vmagent_dns_table_age_seconds", "Seconds since the name table last changed",
            max(0.0, now - float(updated)),
        )  # fmt: skip
    yield _gauge(
        "vmagent_dns_ready", "1 when the DNS proxy has a name table", bool(dns.get("ready"))
    )


def _identity(identity: Mapping[str, Any] | None) -> Iterator[Metric]:
    if identity is None:
        return
    not_after = identity.get("not_after")
    if not_after:
        yield _gauge(
            "vmagent_cert_expiry_timestamp_seconds",
            "When the workload certificate expires (Unix time)",
            epoch(not_after) or 0.0,
        )
    yield _gauge(
        "vmagent_cert_renewal_failures",
        "Certificate renewals failed in a row",
        identity.get("failures") or 0,
    )


def _xds(xds: Mapping[str, Any]) -> Iterator[Metric]:
    yield _gauge(
        "vmagent_xds_connected",
        "1 while the control-plane stream is up",
        bool(xds.get("connected")),
    )
    yield CounterMetricFamily(
        "vmagent_xds_streams", "Control-plane streams opened", value=float(xds.get("streams") or 0)
    )
    yield CounterMetricFamily(
        "vmagent_xds_pushes",
        "Name table (NDS) pushes received from the control plane",
        value=float(xds.get("name_table_updates") or 0),
    )
    yield CounterMetricFamily(
        "vmagent_xds_nacks", "Pushes rejected (NACKed)", value=float(xds.get("nacks") or 0)
    )


def _health(health: Mapping[str, Any] | None) -> Iterator[Metric]:
    if health is None:
        return
    yield _gauge(
        "vmagent_health_healthy",
        "1 while the readiness probe reports healthy, 0 otherwise",
        health.get("state") == "healthy",
    )
    yield CounterMetricFamily(
        "vmagent_health_probes",
        "Readiness probe rounds run",
        value=float(health.get("probes") or 0),
    )


def _envoy(envoy: Mapping[str, Any] | None) -> Iterator[Metric]:
    if envoy is None:
        return
    yield CounterMetricFamily(
        "vmagent_envoy_restarts",
        "Envoy restarts after an exit",
        value=float(envoy.get("restarts") or 0),
    )
    yield _gauge(
        "vmagent_envoy_live", "1 while Envoy's server state is LIVE", bool(envoy.get("live"))
    )
    rss = (envoy.get("process") or {}).get("rss_bytes")
    if rss is not None:
        yield _gauge("vmagent_envoy_resident_memory_bytes", "Envoy's resident memory", rss)


def _capture(capture: Mapping[str, Any] | None) -> Iterator[Metric]:
    if capture is None:
        return
    yield _gauge(
        "vmagent_capture_applied",
        "1 while traffic capture is in place (by the agent or `vmagent capture apply`)",
        bool(capture.get("applied")),
    )
    redirect = capture.get("dns_redirect")
    if redirect is not None:  # known only while DNS is captured
        yield _gauge(
            "vmagent_capture_dns_redirect",
            "1 while DNS is redirected to the agent, 0 when the fail-open watchdog dropped it",
            redirect == "on",
        )


def families(doc: Mapping[str, Any], now: float) -> Iterator[Metric]:
    """Metric families from the raw state ``doc`` at wall-clock ``now`` (pure)."""
    info = GaugeMetricFamily("vmagent_build_info", "vmagent's version", labels=["version"])
    info.add_metric([str(doc.get("version"))], 1.0)
    yield info
    yield _gauge("vmagent_ready", "1 when /healthz/ready answers 200", bool(doc.get("ready")))
    started = doc.get("started")
    if isinstance(started, (int, float)):
        yield _gauge("vmagent_start_time_seconds", "When the agent started (Unix time)", started)
    yield from _identity(doc.get("identity"))
    yield from _xds(doc.get("xds") or {})
    yield from _dns(doc.get("dns") or {}, doc.get("name_table") or {}, now)
    yield from _health(doc.get("health"))
    yield from _envoy(doc.get("envoy"))
    yield from _capture(doc.get("capture"))
    restarts = CounterMetricFamily(
        "vmagent_part_restarts", "Restarts of the agent's parts after a failure", labels=["part"]
    )
    for name, part in sorted((doc.get("parts") or {}).items()):
        restarts.add_metric([name], float(part.get("restarts") or 0))
    yield restarts
