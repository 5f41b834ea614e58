"""The README's first command: ``vmagent dev`` brings up devmesh, the demo app, the agent and
its Envoy; mesh names answer through the agent's DNS proxy, the VM registers healthy, and the
banner's one command carries a request through Envoy with Istio mTLS to the demo app, which
prints the VM's SPIFFE ID. Every port it (and its Envoy) opens moves with a flag (so these tests
never touch 15012/15014/15053/15020/8080 or Envoy's 15000/15001/15006/15021/15090), the
WorkloadGroup can be deleted and created again while it runs, and Ctrl-C stops it quietly,
Envoy included."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import yaml
from loopback import free_port

from vmagent.devmesh.dev import CHECKOUT_CONFIG

T = TypeVar("T")
DEFAULT_PORTS = {15012, 15014, 15053, 15020, 8080, 15000, 15001, 15006, 15021, 15090}
SPIFFE_ID = "spiffe://cluster.local/ns/vm/sa/vm-web"
SERVICE = "vm-web.vm.svc.cluster.local"
NOISE = (
    "Traceback",
    "Event loop is closed",
    "was never awaited",
    "Exception ignored",
    "sds-grpc closed",  # Envoy's SDS stream cut before Envoy exited
    "gRPC config stream",  # the same for the xDS proxy's stream
)
README_SHAPE = "readme-shape"


def eventually(check: Callable[[], T | None], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def dig(port: int, name: str) -> list[str]:
    out = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), name, "+short", "+time=1", "+tries=1"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return [line.strip() for line in out.stdout.splitlines() if line and not line.startswith(";")]


def get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def clean_env(tmp_path: Path) -> dict[str, str]:
    """No VMAGENT_*/ISTIO_* settings from the developer's shell; unknown names go to a closed
    loopback port, never to this machine's resolver."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VMAGENT_", "ISTIO_", "DNS_PROXY", "CA_", "PROXY_CONFIG"))
    }
    env["VMAGENT_DNS_UPSTREAMS"] = f"127.0.0.1:{free_port()}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Dev:
    process: subprocess.Popen[str]
    ports: dict[str, int]
    config: Path
    log: Path
    outbound_bind: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def entries(self) -> list[dict[str, Any]]:
        registry = get_json(f"http://127.0.0.1:{self.ports['debug']}/debug/registry") or {}
        found: list[dict[str, Any]] = registry.get("workloadEntries") or []
        return found

    def healthy_entry(self) -> dict[str, Any] | None:
        return next((e for e in self.entries() if e.get("healthy")), None)

    def stop(self, signum: int = signal.SIGINT) -> tuple[int, str]:
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
            raise AssertionError(f"vmagent dev did not stop:\n{self.output()}") from None
        return code, self.output()


@pytest.fixture
def dev(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Dev]:
    """``vmagent dev`` with every port moved; indirect parameters add environment settings,
    and ``README_SHAPE`` leaves vm.yaml as shipped (service and template port 8080: only the
    flags move the ports, as in the README's example)."""
    extra_env: dict[str, str] = dict(getattr(request, "param", {}))
    readme_shape = bool(extra_env.pop(README_SHAPE, ""))
    if shutil.which("dig") is None:
        pytest.skip("dig not installed (scripts/setup --test installs it)")
    names = ("xds", "debug", "dns", "status", "app", "service")
    names += ("admin", "inbound", "outbound", "readiness", "prometheus")
    ports = {name: free_port() for name in names}
    config = tmp_path / "mesh"
    shutil.copytree(CHECKOUT_CONFIG, config)
    if readme_shape:
        ports["service"] = 8080  # on a loopback address of its own: no collision
    else:
        _move_vm_ports(config / "vm.yaml", ports["service"], ports["app"])
    # A loopback address of its own for the outbound listeners (bookinfo's 9080, ...), so
    # two runs (or a developer's `vmagent dev`) never collide.
    bind = loopback_address()
    log = tmp_path / "dev.log"
    argv = [
        sys.executable, "-m", "vmagent", "dev",
        "--dir", str(tmp_path / "dev"),
        "--config", str(config),
        "--listen", f"127.0.0.1:{ports['xds']}",
        "--debug-listen", f"127.0.0.1:{ports['debug']}",
        "--dns-listen", f"127.0.0.1:{ports['dns']}",
        "--status-listen", f"127.0.0.1:{ports['status']}",
        "--app-port", str(ports["app"]),
        "--envoy-admin-port", str(ports["admin"]),
        "--inbound-port", str(ports["inbound"]),
        "--outbound-port", str(ports["outbound"]),
        "--readiness-port", str(ports["readiness"]),
        "--prometheus-port", str(ports["prometheus"]),
        "--outbound-bind", bind,
        "--ip", "127.0.0.1",
    ]  # fmt: skip
    with log.open("w") as sink:
        env = clean_env(tmp_path) | extra_env
        process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    running = Dev(process, ports, config, log, bind)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def loopback_address() -> str:
    """A random 127/8 address (Linux routes all of 127/8 to lo)."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def _move_vm_ports(vm_yaml: Path, service_port: int, app_port: int) -> None:
    """The example's vm-web service and WorkloadGroup on free ports: the service port (an
    outbound listener) and the workload's port (where Envoy's inbound sends requests: the demo
    app's --app-port)."""
    document = yaml.safe_load(vm_yaml.read_text())
    for group in document["workloadGroups"]:
        group["template"]["ports"]["http"] = app_port
    for service in document["services"]:
        service["ports"][0]["port"] = service_port
    vm_yaml.write_text(yaml.safe_dump(document, sort_keys=False))


def banner_request(output: str) -> list[str]:
    """The banner's command for a request through Envoy (the one line naming /whoami)."""
    (line,) = [
        ln for ln in output.splitlines() if ln.strip().startswith("curl") and "/whoami" in ln
    ]
    return shlex.split(line.strip())


def banner_status(output: str) -> list[str]:
    """The banner's ``vmagent status --addr HOST:PORT`` line (its program spelled as the user
    can paste it: ``vmagent`` or a path), as argv for this interpreter."""
    (line,) = [ln for ln in output.splitlines() if " status --addr " in ln]
    words = shlex.split(line.strip())
    return [sys.executable, "-m", "vmagent", *words[words.index("status") :]]


def run_status(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return result if result.returncode == 0 else None


def run_request(argv: list[str]) -> dict[str, Any] | None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    try:
        answer: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        return None
    return answer if answer.get("peer") else None


def envoy_stats(admin_port: int) -> dict[str, int]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            stats[name] = int(value)
    return stats


@pytest.mark.timeout(120)
def test_vmagent_dev_runs_a_mesh_on_one_machine(dev: Dev) -> None:
    # A Kubernetes service from examples/devmesh answers through the agent's DNS proxy.
    assert eventually(lambda: dig(dev.ports["dns"], "productpage.bookinfo.svc.cluster.local")) == [
        "10.96.0.20"
    ]
    # The VM registered itself into WorkloadGroup vm/vm-web and its probe (the demo app, on
    # the port --app-port chose) passes.
    entry = eventually(dev.healthy_entry)
    metadata = entry["metadata"]
    assert isinstance(metadata, dict) and metadata["name"].startswith("vm-web-")
    address = entry["spec"]["address"]
    # The headless service selecting the group resolves to this VM.
    assert address in eventually(
        lambda: dig(dev.ports["dns"], "vm-web-direct.vm.svc.cluster.local")
    )
    status = eventually(lambda: get_json(f"http://127.0.0.1:{dev.ports['status']}/status"))
    assert status["ready"] is True and status["not_ready"] == []
    assert status["identity"]["spiffe_id"] == "spiffe://cluster.local/ns/vm/sa/vm-web"
    with urllib.request.urlopen(f"http://127.0.0.1:{dev.ports['app']}/healthz", timeout=5) as r:
        assert r.read().startswith(b"hello from vm/vm-web")
    banner = dev.output()
    assert f"dig @127.0.0.1 -p {dev.ports['dns']} productpage" in banner
    assert f"demo app answering the WorkloadGroup probe on 127.0.0.1:{dev.ports['app']}" in banner

    # The banner's one command: through Envoy's outbound listener, Istio mTLS to Envoy's
    # inbound listener, to the demo app, which prints the identity its sidecar saw.
    argv = banner_request(banner)
    assert f"{dev.outbound_bind}:{dev.ports['service']}/whoami" in argv[-1], argv
    answer = eventually(lambda: run_request(argv), timeout=30)
    assert answer["peer"] == SPIFFE_ID, answer
    # By= is what the inbound Envoy adds after verifying the client certificate: mTLS.
    assert answer["x-forwarded-client-cert"].startswith(f"By={SPIFFE_ID};Hash="), answer
    stats = envoy_stats(dev.ports["admin"])
    assert stats[f"listener.127.0.0.1_{dev.ports['inbound']}.ssl.handshake"] >= 1, stats
    assert stats[f"cluster.outbound|{dev.ports['service']}||{SERVICE}.ssl.handshake"] >= 1
    children = psutil.Process(dev.process.pid).children()
    envoy = [child for child in children if child.name() == "envoy"]
    assert len(envoy) == 1, children
    # The banner's `vmagent status` command finds this agent (its socket is not in
    # /run/vmagent) and says healthy: exit 0.
    status_argv = banner_status(banner)
    assert status_argv[-2:] == ["--addr", f"127.0.0.1:{dev.ports['status']}"], status_argv
    shown = eventually(lambda: run_status(status_argv), timeout=30)
    assert "vm-web" in shown.stdout, shown

    # Every port moved: nothing of this process or its Envoy listens on a default port.
    listening = {
        c.laddr.port
        for process in [psutil.Process(dev.process.pid), *envoy]
        for c in process.net_connections(kind="inet")
        if c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE)
    }
    assert set(dev.ports.values()) <= listening, listening
    assert not listening & DEFAULT_PORTS, listening

    # istio/istio#45329: the WorkloadGroup is deleted (its entry goes, as by the
    # ownerReference), then created again: the connected VM is registered again within a
    # second or two, with its health, without restarting the agent.
    vm_yaml = dev.config / "vm.yaml"
    original = vm_yaml.read_text()
    document = yaml.safe_load(original)
    document.pop("workloadGroups")
    _write(vm_yaml, yaml.safe_dump(document))
    eventually(lambda: not dev.entries(), timeout=10)
    _write(vm_yaml, original)
    started = time.monotonic()
    back = eventually(dev.healthy_entry, timeout=10)
    assert time.monotonic() - started < 3.0, "the entry came back only after a reconnect"
    assert back["metadata"]["name"] == metadata["name"]
    assert back["status"]["conditions"][0]["status"] == "True"

    # Ctrl-C: a clean stop, no tracebacks, no "Event loop is closed", no Envoy left.
    code, output = dev.stop(signal.SIGINT)
    assert code == 0, output
    assert not [noise for noise in NOISE if noise in output], output
    assert not [p for p in envoy if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dev", [{"VMAGENT_ENVOY": "false"}], indirect=True)
def test_vmagent_dev_without_envoy(dev: Dev) -> None:
    # VMAGENT_ENVOY=false: DNS and identity only, as before; no Envoy, no mesh request shown.
    status = eventually(lambda: get_json(f"http://127.0.0.1:{dev.ports['status']}/status"))
    eventually(lambda: get_json(f"http://127.0.0.1:{dev.ports['status']}/status")["ready"])
    assert status["envoy"] is None, status["envoy"]
    assert eventually(dev.healthy_entry)
    assert "/whoami" not in dev.output() and "Try:" in dev.output()
    children = psutil.Process(dev.process.pid).children(recursive=True)
    assert "envoy" not in [child.name() for child in children]
    code, output = dev.stop(signal.SIGINT)
    assert code == 0, output


def _write(path: Path, text: str) -> None:
    """Atomically, and with a new mtime/size the config poller notices."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_dev_help_lists_how_to_move_every_port() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmagent", "dev", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for flag in [*PORT_FLAGS.values(), "--outbound-bind", "--ip"]:
        assert re.search(rf"^\s+{flag} ", result.stdout, re.MULTILINE), (flag, result.stdout)
    for port in ("15012", "15014", "15053", "15020", "8080", "15000", "15001", "15006"):
        assert port in result.stdout  # the defaults they move from
    assert "15021" in result.stdout and "15090" in result.stdout and "127.0.0.2" in result.stdout


PORT_FLAGS = {
    "xds": "--listen",
    "debug": "--debug-listen",
    "dns": "--dns-listen",
    "status": "--status-listen",
    "app": "--app-port",
    "admin": "--envoy-admin-port",
    "inbound": "--inbound-port",
    "outbound": "--outbound-port",
    "readiness": "--readiness-port",
    "prometheus": "--prometheus-port",
}
HOSTPORT_FLAGS = ("xds", "debug", "dns", "status")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", list(PORT_FLAGS))
def test_dev_port_in_use_is_one_clear_line(tmp_path: Path, which: str) -> None:
    # Envoy's ports included: Envoy itself would only log the failed bind and never be ready.
    ports = {name: free_port() for name in PORT_FLAGS}
    argv = [sys.executable, "-m", "vmagent", "dev", "--dir", str(tmp_path / "dev")]
    argv += ["--ip", "127.0.0.1", "--outbound-bind", loopback_address()]
    for name, flag in PORT_FLAGS.items():
        value = f"127.0.0.1:{ports[name]}" if name in HOSTPORT_FLAGS else str(ports[name])
        argv += [flag, value]
    with _occupied(ports[which]):
        result = subprocess.run(
            argv, env=clean_env(tmp_path), capture_output=True, text=True, timeout=40
        )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(errors) == 1, result.stderr
    (line,) = errors
    assert line.startswith("vmagent dev: ") and str(ports[which]) in line, line
    assert PORT_FLAGS[which] in line and "[Errno" not in line, line


class _occupied:
    """127.0.0.1:PORT held for TCP (listening) and UDP while the block runs."""

    def __init__(self, port: int) -> None:
        import socket

        self.sockets = [
            socket.socket(socket.AF_INET, socket.SOCK_STREAM),
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        ]
        for sock in self.sockets:
            sock.bind(("127.0.0.1", port))
        self.sockets[0].listen()

    def __enter__(self) -> _occupied:
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dev", [{README_SHAPE: "1"}], indirect=True)
def test_readme_moved_port_example_works_unchanged(dev: Dev) -> None:
    """README's beside-a-real-agent example: vm.yaml as shipped (template port 8080) and
    every port moved by a flag, ``--app-port`` included. The banner's request reaches the
    demo app (Envoy's inbound forwards to --app-port, not to 8080); a template port edited
    while it runs reaches the WorkloadEntry and Envoy's inbound cluster; Ctrl-C is quiet."""
    app = dev.ports["app"]
    entry = eventually(dev.healthy_entry)
    assert entry["spec"]["ports"] == {"http": app}, entry  # the flag, not vm.yaml's 8080
    argv = banner_request(dev.output())
    assert f"{dev.outbound_bind}:8080/whoami" in argv[-1], argv
    answer = eventually(lambda: run_request(argv), timeout=30)
    assert answer["peer"] == SPIFFE_ID, answer
    assert "Envoy forwards it to" not in dev.output()  # no "but ..." caveat any more

    # Edit the template port while running: the entry and the inbound cluster follow.
    moved = free_port()
    vm_yaml = dev.config / "vm.yaml"
    document = yaml.safe_load(vm_yaml.read_text())
    document["workloadGroups"][0]["template"]["ports"]["http"] = moved
    _write(vm_yaml, yaml.safe_dump(document, sort_keys=False))
    edited = eventually(
        lambda: next((e for e in dev.entries() if e["spec"].get("ports") == {"http": moved}), None),
        timeout=10,
    )
    assert edited["metadata"]["name"] == entry["metadata"]["name"]  # the same registration
    eventually(lambda: f"inbound|{moved}||" in envoy_clusters(dev.ports["admin"]), timeout=10)

    code, output = dev.stop(signal.SIGINT)
    assert code == 0, output
    assert not [noise for noise in NOISE if noise in output], output


def envoy_clusters(admin_port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""
