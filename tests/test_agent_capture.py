"""``vmagent run``'s capture decision (vmagent/agent_capture.py): the pure parts. The real
thing, iptables in namespaces, is tests/e2e/test_e2e_two_vms.py."""

from __future__ import annotations

import os

from vmagent.agent_capture import AgentCapture, has_net_admin
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
