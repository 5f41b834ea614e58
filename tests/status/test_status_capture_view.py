"""Capture in ``/status?v=1`` (pure): off and why, applied and by whom, the DNS redirect the
fail-open watchdog dropped, each problem with what to do, the Capture section of the human
output and the ``vmagent_capture_*`` gauges read by Prometheus's parser."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from test_status_view import NOW, keys_and_times, raw_state

from vmagent.status.metrics import AgentMetrics
from vmagent.status.render import render
from vmagent.status.view import rfc3339, status_v1

APPLIED = {
    "asked": True, "wanted": True, "applied": True, "by": "agent", "dns_captured": True,
    "dns_redirect": "on", "dns_redirect_since": NOW - 30, "last_error": None,
}  # fmt: skip


def view_with(**capture: Any) -> dict[str, Any]:
    return status_v1(raw_state(capture=APPLIED | capture), NOW)


def test_applied_capture_is_healthy_and_shown() -> None:
    view = view_with()
    assert view["state"] == "healthy" and view["problems"] == []
    assert view["capture"] == {
        "cluster_env_asks": True, "wanted": True, "applied": True, "by": "agent",
        "dns_captured": True, "dns_redirect": "on",
        "dns_redirect_since": rfc3339(NOW - 30), "last_error": None,
    }  # fmt: skip
    assert keys_and_times(view) == []
    text = render(view)
    assert "Capture\n  applied:" in text and "yes, by agent" in text
    assert "DNS redirect:" in text


def test_not_wanted_says_why_and_is_no_problem() -> None:
    off = {"asked": False, "wanted": False, "applied": False, "by": None, "dns_redirect": None}
    view = view_with(**off)
    assert view["state"] == "healthy" and view["capture"]["applied"] is False
    assert "Capture\n  off (cluster.env asks for none)" in render(view)
    opted_out = view_with(**(off | {"asked": True}))
    assert opted_out["problems"] == []
    assert "off (VMAGENT_CAPTURE=false)" in render(opted_out)


def test_applied_by_root_beforehand() -> None:
    view = view_with(wanted=False, by="vmagent capture apply")
    assert view["problems"] == []
    assert "yes, by vmagent capture apply" in render(view)


def test_wanted_but_not_applied_says_what_to_do() -> None:
    view = view_with(applied=False, by=None, dns_redirect=None)
    assert view["state"] == "degraded"
    [problem] = view["problems"]
    assert problem["part"] == "capture"
    assert "wanted (cluster.env) but not applied" in problem["message"]
    assert "vmagent capture apply" in problem["action"]
    assert "systemctl restart vmagent" in problem["action"]
    assert "what to do: the applications' traffic and DNS bypass the mesh" in render(view)


def test_dns_redirect_dropped_by_the_watchdog() -> None:
    view = view_with(dns_redirect="off", dns_redirect_since=NOW - 90)
    assert view["state"] == "degraded"
    [problem] = view["problems"]
    assert problem["part"] == "capture" and "fail-open watchdog" in problem["message"]
    assert problem["action"].startswith(
        "DNS is answered by the host resolver; mesh names won't resolve until"
    )
    text = render(view)
    assert "off: dropped by the fail-open watchdog, since" in text and "90s ago" in text


def test_watchdog_error_is_a_problem() -> None:
    view = view_with(last_error="iptables-restore failed: locked")
    assert [p["message"] for p in view["problems"]] == ["capture: iptables-restore failed: locked"]


def test_dns_not_captured_is_said() -> None:
    view = view_with(dns_captured=False, dns_redirect=None)
    assert view["problems"] == []
    assert "not captured (ISTIO_META_DNS_CAPTURE is not true)" in render(view)


def test_an_agent_without_capture_in_its_state_keeps_the_schema() -> None:
    doc = raw_state()
    doc.pop("capture", None)
    view = status_v1(doc, NOW)
    assert view["capture"] is None and view["state"] == "healthy"
    assert "Capture" not in render(view)


def test_capture_gauges() -> None:
    def gauges(capture: dict[str, Any]) -> dict[str, float]:
        doc = raw_state(capture=capture)
        text = AgentMetrics(lambda: doc, clock=lambda: NOW).agent_text().decode()
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("vmagent_capture_")
        }

    assert gauges(APPLIED) == {"vmagent_capture_applied": 1, "vmagent_capture_dns_redirect": 1}
    dropped = APPLIED | {"dns_redirect": "off"}
    assert gauges(dropped) == {"vmagent_capture_applied": 1, "vmagent_capture_dns_redirect": 0}
    off = APPLIED | {"wanted": False, "applied": False, "dns_redirect": None}
    assert gauges(off) == {"vmagent_capture_applied": 0}
