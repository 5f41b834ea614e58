"""Capture in ``vmagent status`` for real: ``vmagent run`` as root against devmesh in network
namespaces the test creates (tests/e2e/two_vms.py's VM-A, without Envoy), with cluster.env's
``ISTIO_META_DNS_CAPTURE``, ``ISTIO_SERVICE_CIDR`` and ``ISTIO_INBOUND_PORTS``: ``--json``
shows ``capture.applied`` true (by the agent, DNS redirect on), the text a Capture section.
Then the agent's DNS port stops answering the fail-open watchdog (a REJECT rule for its probe):
the watchdog drops the DNS redirect and status says so (exit 1, what to do); once the port
answers again the redirect is back and status is healthy."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_helpers import own_network_namespace
from two_vms import TwoVms, Vm, skip_reason, wait_until

pytestmark = pytest.mark.timeout(150)

# The watchdog probes 127.0.0.1:15053 over TCP; the agent's UDP DNS keeps serving meanwhile.
BLOCK_PROBE = ["OUTPUT", "-p", "tcp", "-d", "127.0.0.1", "--dport", "15053", "-j", "REJECT",
               "--reject-with", "tcp-reset"]  # fmt: skip


@pytest.fixture
def vm_a() -> Iterator[tuple[TwoVms, Vm]]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with own_network_namespace():
        world = TwoVms.create()
        try:
            world.build()
            world.start_mesh()
            vm = world.vms["a"]
            world.prepare_vm(vm)
            world.start_agent(vm, VMAGENT_ENVOY="false")
            wait_until("VM-A agent ready", lambda: world._ready(vm), 60)
            yield world, vm
        finally:
            print(world.logs())
            world.close()


def status(world: TwoVms, vm: Vm, *args: str) -> subprocess.CompletedProcess[str]:
    """``vmagent status`` over the agent's Unix socket (a path: any namespace reaches it)."""
    return subprocess.run(
        [sys.executable, "-m", "vmagent", "status", *args],
        env=world.agent_env(vm, VMAGENT_ENVOY="false"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def capture_of(world: TwoVms, vm: Vm) -> dict[str, Any]:
    done = status(world, vm, "--json")
    assert done.returncode in (0, 1), done
    capture: dict[str, Any] = json.loads(done.stdout)["capture"]
    return capture


def test_status_shows_capture_applied_and_the_dns_redirect_failing_open(
    vm_a: tuple[TwoVms, Vm],
) -> None:
    world, vm = vm_a
    done = status(world, vm, "--json", "--wait", "30")
    assert done.returncode == 0, done
    view = json.loads(done.stdout)
    assert view["capture"]["applied"] is True  # the key path the boot test asserts
    assert view["capture"]["by"] == "agent" and view["capture"]["wanted"] is True
    assert view["capture"]["dns_redirect"] == "on" and view["capture"]["last_error"] is None
    text = status(world, vm).stdout
    assert "Capture\n  applied:" in text and "yes, by agent" in text, text
    assert "No problems." in text

    vm.run("iptables", "-I", *BLOCK_PROBE)
    try:
        wait_until(
            "the watchdog dropping the DNS redirect",
            lambda: capture_of(world, vm)["dns_redirect"] == "off", 20,
        )  # fmt: skip
        nat = vm.run("iptables-save", "-t", "nat").stdout
        assert "-j VMAGENT_DNS" not in nat, nat  # really dropped, as status says
        dropped = status(world, vm)
        assert dropped.returncode == 1, dropped
        assert "dropped by the fail-open watchdog" in dropped.stdout
        assert "DNS is answered by the host resolver; mesh names won't resolve" in dropped.stdout
        assert "degraded: capture" in dropped.stderr
    finally:
        vm.run("iptables", "-D", *BLOCK_PROBE)
    wait_until("the DNS redirect back", lambda: capture_of(world, vm)["dns_redirect"] == "on", 20)
    assert status(world, vm).returncode == 0
