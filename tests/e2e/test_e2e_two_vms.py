"""Two VMs talking through their Envoys with mTLS, with traffic capture, in network namespaces
the test creates (tests/e2e/two_vms.py): devmesh + dnsmasq at 10.77.0.1, VM-A (10.77.0.2,
``vmagent run`` as root applying the capture) and VM-B (10.77.0.3, ``vmagent capture apply``
then ``vmagent run`` as uid 1337) with an HTTP app on 8080.

- VM-A's app user curls ``http://backend.two.svc.cluster.local:8080/``: the name resolves
  through the captured DNS, the request crosses both Envoys with mTLS, and the app sees VM-A's
  SPIFFE ID in ``x-forwarded-client-cert``;
- ``kill -9`` VM-B's Envoy: restarted, traffic resumes, its WorkloadEntry never disconnected;
- VM-B's app unhealthy: its WorkloadEntry unhealthy, requests get 503 and never reach it;
- ``kill -9`` VM-A's agent: VM-A still resolves upstream names via its normal resolver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from e2e_helpers import own_network_namespace
from two_vms import (
    BACKEND,
    BACKEND_VIP,
    UPSTREAM_IP,
    UPSTREAM_NAME,
    TwoVms,
    skip_reason,
    wait_until,
)

pytestmark = pytest.mark.timeout(150)

CLIENT_ID = "spiffe://cluster.local/ns/two/sa/client"
URL = f"http://{BACKEND}:8080/"


@pytest.fixture
def two() -> Iterator[TwoVms]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with own_network_namespace():
        world = TwoVms.create()
        try:
            world.build()
            yield world
        finally:
            print(world.logs())
            world.close()


def _through_mesh(two: TwoVms) -> dict[str, str] | None:
    code, body = two.vms["a"].curl(URL)
    if code != 200:
        return None
    answer: dict[str, str] = json.loads(body)
    return answer


def test_two_vms_mtls_through_captured_traffic(two: TwoVms) -> None:
    two.start()
    a, b = two.vms["a"], two.vms["b"]
    # DNS: the app user's resolver (resolv.conf: 10.77.0.1) is captured by VM-A's agent.
    assert a.dig(BACKEND) == BACKEND_VIP
    assert a.dig(UPSTREAM_NAME) == UPSTREAM_IP  # forwarded, no loop (agent exempt)

    answer = wait_until("a request through both Envoys", lambda: _through_mesh(two), 30)
    xfcc = answer["xfcc"]
    assert xfcc and xfcc.endswith(f"URI={CLIENT_ID}"), answer
    assert "By=spiffe://cluster.local/ns/two/sa/backend" in xfcc, answer
    entry = two.entry("b")
    assert entry is not None and entry["healthy"] is True, entry
    connected = entry["metadata"]["annotations"]["istio.io/connectedAt"]

    # kill -9 VM-B's Envoy: restarted by its agent, traffic resumes, entry never disconnected.
    status = b.status()
    assert status is not None
    os.kill(status["envoy"]["pid"], signal.SIGKILL)
    seen: list[dict[str, object] | None] = []

    def resumed() -> bool:
        seen.append(two.entry("b"))
        now = b.status()
        restarted = now is not None and now["envoy"]["restarts"] >= 1 and now["envoy"]["live"]
        return bool(restarted and _through_mesh(two))

    wait_until("traffic through VM-B's restarted Envoy", resumed, 30)
    for got in seen:
        assert got is not None, "VM-B's WorkloadEntry vanished"
        annotations = got["metadata"]["annotations"]  # type: ignore[index]
        assert "istio.io/disconnectedAt" not in annotations, got
        assert annotations["istio.io/connectedAt"] == connected, got

    # VM-B's app unhealthy: its entry goes unhealthy, no request reaches it.
    two.set_sick(True)
    wait_until("VM-B unhealthy in devmesh", lambda: (two.entry("b") or {}).get("healthy") is False)
    hits = two.hits()

    def refused() -> bool:
        return a.curl(URL)[0] == 503

    wait_until("VM-A gets 503 (no healthy upstream)", refused, 15)
    for _ in range(3):
        code, body = a.curl(URL)
        assert code == 503, (code, body)
    assert two.hits() == hits
    two.set_sick(False)
    wait_until("VM-B healthy again", lambda: (two.entry("b") or {}).get("healthy") is True)

    # kill -9 VM-A's agent: DNS fails open to the normal resolver.
    assert a.agent is not None
    a.agent.send_signal(signal.SIGKILL)
    a.agent.wait(timeout=10)
    start = time.monotonic()
    wait_until("VM-A resolves via its normal resolver", lambda: a.dig(UPSTREAM_NAME) == UPSTREAM_IP)
    print(f"DNS failed open {time.monotonic() - start:.1f} s after kill -9 of VM-A's agent")
    nat = a.run("iptables-save", "-t", "nat").stdout
    assert "-j VMAGENT_DNS" not in nat, nat  # only DNS fails open: outbound stays captured
    assert "-j VMAGENT_REDIRECT" in nat, nat


def test_capture_without_net_admin_is_fatal(tmp_path: object) -> None:
    """``vmagent run`` as a user without CAP_NET_ADMIN, capture asked for and not applied by
    root before: exit 2 naming the settings and ``vmagent capture apply``."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with own_network_namespace():
        world = TwoVms.create()
        try:
            env = world.agent_env_plain()
            done = subprocess.run(
                ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups",
                 sys.executable, "-m", "vmagent", "run"],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            world.close()
    assert done.returncode == 2, done.stderr
    assert "CAP_NET_ADMIN" in done.stderr and "vmagent capture apply" in done.stderr
    assert "ISTIO_SERVICE_CIDR" in done.stderr


def test_root_agent_applies_capture_and_removes_it_on_stop() -> None:
    """``vmagent run`` as root with capture asked for: the rules and the DNS watchdog are in
    place once it serves, and SIGTERM removes both (exit 0)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with own_network_namespace():
        world = TwoVms.create()
        proc = None
        try:
            env = world.agent_env_plain()
            run_dir = world.work / "plain" / "run"
            proc = subprocess.Popen(
                [sys.executable, "-m", "vmagent", "run"], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip

            def nat() -> str:
                return subprocess.run(
                    ["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True
                ).stdout

            def applied() -> bool:  # the marker is written last, after the watchdog starts
                return (run_dir / "capture.applied").exists() and "-j VMAGENT_OUTPUT" in nat()

            wait_until("the agent's capture rules and marker", applied, 20)
            watchdog = int((run_dir / "capture-watch.pid").read_text())
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=30)[0].decode(errors="replace")
            assert proc.returncode == 0, out
            assert "VMAGENT" not in nat(), out
            assert not (run_dir / "capture.applied").exists()
            wait_until("the watchdog gone", lambda: not os.path.exists(f"/proc/{watchdog}"), 5)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            world.close()


def test_capture_by_a_user_not_exempt_is_fatal() -> None:
    """``vmagent run`` with CAP_NET_ADMIN as a user the rules would not exempt: exit 2 (its own
    upstream DNS queries would loop back into it), naming PROXY_UID."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with own_network_namespace():
        world = TwoVms.create()
        try:
            env = world.agent_env_plain()
            done = subprocess.run(
                ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups",
                 "--inh-caps=+net_admin", "--ambient-caps=+net_admin",
                 sys.executable, "-m", "vmagent", "run"],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            world.close()
    assert done.returncode == 2, done.stderr
    assert "uid 4242" in done.stderr and "PROXY_UID" in done.stderr, done.stderr
