"""The README's first command: ``vmagent dev`` brings up devmesh, the demo app and the agent;
mesh names answer through the agent's DNS proxy and the VM registers healthy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from loopback import free_port

T = TypeVar("T")


def eventually(check: Callable[[], T | None], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def dig(port: int, name: str) -> list[str]:
    out = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), name, "+short", "+time=1", "+tries=1"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return [line.strip() for line in out.stdout.splitlines() if line and not line.startswith(";")]


def get_json(url: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except OSError:
        return None


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[dict[str, int]]:
    if not Path("/usr/bin/dig").exists():
        pytest.skip("dig not installed")
    ports = {
        "xds": free_port(),
        "debug": free_port(),
        "dns": free_port(),
        "status": free_port(),
        "upstream": free_port(),
    }
    env = {
        **os.environ,
        "DNS_PROXY_ADDR": f"127.0.0.1:{ports['dns']}",
        "VMAGENT_STATUS_ADDR": f"127.0.0.1:{ports['status']}",
        # Unknown names go to a closed loopback port, never to this machine's resolver.
        "VMAGENT_DNS_UPSTREAMS": f"127.0.0.1:{ports['upstream']}",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmagent",
            "dev",
            "--dir",
            str(tmp_path / "dev"),
            "--listen",
            f"127.0.0.1:{ports['xds']}",
            "--debug-listen",
            f"127.0.0.1:{ports['debug']}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield ports
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        assert process.returncode == 0, output


@pytest.mark.timeout(120)
def test_vmagent_dev_runs_a_mesh_on_one_machine(dev: dict[str, int]) -> None:
    # A Kubernetes service from examples/devmesh answers through the agent's DNS proxy.
    assert eventually(lambda: dig(dev["dns"], "productpage.bookinfo.svc.cluster.local")) == [
        "10.96.0.20"
    ]
    # The VM registered itself into WorkloadGroup vm/vm-web and its probe (the demo app) passes.
    registry_url = f"http://127.0.0.1:{dev['debug']}/debug/registry"

    def healthy_entry() -> dict[str, object] | None:
        registry = get_json(registry_url) or {}
        entries = registry.get("workloadEntries") or []
        assert isinstance(entries, list)
        return next((e for e in entries if e.get("healthy")), None)

    entry = eventually(healthy_entry)
    metadata = entry["metadata"]
    assert isinstance(metadata, dict) and metadata["name"].startswith("vm-web-")
    address = entry["spec"]["address"]  # type: ignore[index]
    # The headless service selecting the group resolves to this VM.
    assert address in eventually(lambda: dig(dev["dns"], "vm-web-direct.vm.svc.cluster.local"))
    status = eventually(lambda: get_json(f"http://127.0.0.1:{dev['status']}/status"))
    assert status["ready"] is True and status["not_ready"] == []
    assert status["identity"]["spiffe_id"] == "spiffe://cluster.local/ns/vm/sa/vm-web"  # type: ignore[index]
