"""``vmagent run``'s capture decision (vmagent/agent_capture.py): the pure parts, and the
state it reports to ``vmagent status`` from the files in VMAGENT_RUN_DIR. The real
thing, iptables in namespaces, is tests/e2e/test_e2e_two_vms.py."""

from __future__ import annotations

import os
from pathlib import Path

from vmagent.agent_capture import AgentCapture, has_net_admin
from vmagent.capture.shell import APPLIED_MARKER, record_dns
from vmagent.config import load_config


def test_cap_net_admin_is_read_from_the_effective_set() -> None:
    assert has_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert has_net_admin("CapEff:\t0000000000001000\n")  # bit 12 alone
    assert not has_net_admin("CapEff:\t0000000000000400\n")  # CAP_NET_BIND_SERVICE only
    assert not has_net_admin("CapInh:\t0000000000001000\nCapEff:\t0000000000000000\n")
    assert not has_net_admin("")


def _capture(**env: str) -> AgentCapture:
    base = {"VMAGENT_CLUSTER_ENV": os.devnull, "VMAGENT_MESH_CONFIG": os.devnull}
    return AgentCapture(load_config({**base, **env}))


def test_capture_is_wanted_only_when_asked_and_not_opted_out() -> None:
    assert not _capture().wanted
    assert _capture(ISTIO_SERVICE_CIDR="10.96.0.0/16").wanted
    assert _capture(ISTIO_INBOUND_PORTS="*").wanted
    assert _capture(ISTIO_META_DNS_CAPTURE="true").wanted
    assert not _capture(ISTIO_SERVICE_CIDR="*", VMAGENT_CAPTURE="false").wanted


def test_status_reads_the_marker_and_the_watchdog_state(tmp_path: Path) -> None:
    """What `vmagent status` shows: applied by root beforehand (the marker apply leaves), the
    DNS redirect as the watchdog last set it, and `vmagent capture clean` meanwhile."""
    run = str(tmp_path)
    off = _capture(VMAGENT_RUN_DIR=run).status()
    assert (off["asked"], off["wanted"], off["applied"], off["by"]) == (False, False, False, None)
    capture = _capture(VMAGENT_RUN_DIR=run, ISTIO_META_DNS_CAPTURE="true")
    (tmp_path / APPLIED_MARKER).write_text("vmagent capture apply\n")
    record_dns(capture.config, True)
    got = capture.status()
    assert got["applied"] and got["by"] == "vmagent capture apply" and got["dns_captured"]
    assert got["dns_redirect"] == "on" and isinstance(got["dns_redirect_since"], float)
    record_dns(capture.config, False, "iptables-restore failed")  # the watchdog's switch failed
    got = capture.status()
    assert got["dns_redirect"] == "off" and got["last_error"] == "iptables-restore failed"
    capture.applied = True  # as after the agent's own apply
    assert capture.status()["by"] == "agent"
    (tmp_path / APPLIED_MARKER).unlink()  # `vmagent capture clean` by hand
    record_dns(capture.config, None)
    got = capture.status()
    assert not got["applied"] and got["by"] is None and got["dns_redirect"] is None
