"""Shared parts of the data-plane benchmarks (``cold_start_bench.py``, ``rotation_bench.py``,
``footprint_bench.py``): a network namespace of the benchmark's own, processes with their
output in files, ``vmagent devmesh serve`` and ``vmagent run`` as an onboarded VM would run
it, and small HTTP helpers.

Loopback only: each benchmark first moves itself into a fresh network namespace whose only
interface is ``lo`` (needs root; ``ip`` from iproute2). devmesh's listeners for Envoy use fixed
ports (15001/15006) and Envoy's readiness/Prometheus listeners bind ``0.0.0.0``; inside the
namespace that is loopback and nothing collides with the machine's own ports. Every wait is a
bounded poll; every process started is ended by :meth:`Procs.close`."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: the vmagent package beside bench/

from vmagent.devmesh.authority import Authority  # noqa: E402

LOOPBACK = "127.0.0.1"
CLONE_NEWNET = 0x40000000  # <linux/sched.h>
NAMESPACE = "vm"
GROUP = "vm-web"
SERVICE_ACCOUNT = "vm-web"
SPIFFE_ID = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}"
T = TypeVar("T")


def enter_own_netns() -> None:
    """Move this (still single-threaded) process into a new network namespace with ``lo`` up;
    every process it starts inherits it. Exits with a clear message without root or ``ip``."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        sys.exit("this benchmark runs in a network namespace of its own: run it as root, with ip")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        sys.exit(f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy (exceptions count as "not yet")."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
        except Exception as exc:  # not there yet
            value, last = None, exc
        else:
            last = value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise SystemExit(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(every)


def http_get(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        body: bytes = reply.read()
        return body


def http_ok(url: str) -> bool:
    try:
        http_get(url, timeout=1.0)
    except (OSError, urllib.error.HTTPError):
        return False
    return True


def http_json(url: str) -> Any:
    return json.loads(http_get(url))


def envoy_stats(admin_port: int) -> dict[str, int]:
    """Envoy's counters and gauges from admin ``/stats`` (histograms left out)."""
    stats: dict[str, int] = {}
    for line in http_get(f"http://{LOOPBACK}:{admin_port}/stats").decode().splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            stats[name] = int(value)
    return stats


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(5)


class Procs:
    """Processes with stdout+stderr in ``workdir/<n>-<name>.log``; :meth:`close` ends them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> Proc:
        log = self.workdir / f"{len(self.procs) + 1:02d}-{name}.log"
        with log.open("wb") as sink:
            popen = subprocess.Popen(
                argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(10)


def base_env(**extra: str) -> dict[str, str]:
    """os.environ without the developer's VMAGENT_/ISTIO_/... settings, plus ``extra``."""
    prefixes = ("VMAGENT_", "ISTIO_", "DNS_PROXY", "CA_", "PROXY_CONFIG", "SECRET_", "ENVOY_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def vmagent(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmagent", *args]


# --- devmesh and the agent ------------------------------------------------------------------


@dataclass
class Devmesh:
    proc: Proc
    address: str
    debug_url: str
    keydir: Path

    @property
    def root_cert(self) -> Path:
        return self.keydir / "root-cert.pem"

    def mint_token(self) -> str:
        authority = Authority.load_or_create(self.keydir, "cluster.local", time.time())
        token: str = authority.mint_token(NAMESPACE, SERVICE_ACCOUNT, time.time())
        return token

    def registered(self, name: str) -> bool:
        entries = http_json(f"{self.debug_url}/debug/registry").get("workloadEntries") or []
        return any(e.get("metadata", {}).get("name") == name for e in entries)


def start_devmesh(procs: Procs, config_dir: Path, *extra: str, timeout: float = 60) -> Devmesh:
    """``vmagent devmesh serve --no-capture`` on free loopback ports; waits until it answers."""
    port, debug = free_port(), free_port()
    keydir = procs.workdir / "devmesh-keys"
    argv = vmagent(
        "devmesh", "serve", "--config", str(config_dir), "--dir", str(keydir),
        "--listen", f"{LOOPBACK}:{port}", "--debug-listen", f"{LOOPBACK}:{debug}",
        "--no-capture", "--grace", "1s", *extra,
    )  # fmt: skip
    proc = procs.start("devmesh", argv, base_env())
    debug_url = f"http://{LOOPBACK}:{debug}"
    wait_until(lambda: http_ok(f"{debug_url}/debug/registry"), timeout, "devmesh to answer")
    return Devmesh(proc, f"{LOOPBACK}:{port}", debug_url, keydir)


@dataclass
class AgentHome:
    """The files and settings of one onboarded VM (``vmagent run``), under ``home``."""

    home: Path
    ip: str
    status_port: int
    env: dict[str, str]

    @property
    def status_url(self) -> str:
        return f"http://{LOOPBACK}:{self.status_port}"

    @property
    def entry_name(self) -> str:
        return f"{GROUP}-{self.ip}"


def agent_home(
    mesh: Devmesh,
    home: Path,
    ip: str,
    envoy: bool,
    proxy_config: Mapping[str, Any] | None = None,
    **extra: str,
) -> AgentHome:
    """Root cert, token and the cluster.env keys ``vmagent dev`` sets (see its
    ``_prepare_agent``); DNS upstream: a closed loopback port (nothing leaves the machine)."""
    etc, state = home / "etc", home / "state"
    for directory in (etc, state, home / "run"):
        directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mesh.root_cert, etc / "root-cert.pem")
    (etc / "istio-token").write_text(mesh.mint_token())
    (etc / "istio-token").chmod(0o600)
    (home / "resolv.conf").write_text("# no nameservers: VMAGENT_DNS_UPSTREAMS\n")
    status_port = free_port()
    config: dict[str, Any] = {"discoveryAddress": mesh.address, **(proxy_config or {})}
    env = base_env(
        VMAGENT_CONFIG_DIR=str(etc),
        VMAGENT_STATE_DIR=str(state),
        VMAGENT_RUN_DIR=str(home / "run"),
        VMAGENT_STATUS_ADDR=f"{LOOPBACK}:{status_port}",
        VMAGENT_RESOLV_CONF=str(home / "resolv.conf"),
        VMAGENT_DNS_UPSTREAMS=f"{LOOPBACK}:{free_port()}",
        DNS_PROXY_ADDR=f"{LOOPBACK}:{free_port()}",
        VMAGENT_CLUSTER_ENV=os.devnull,
        VMAGENT_MESH_CONFIG=os.devnull,
        OUTPUT_CERTS=str(state / "certs"),
        CREDENTIAL_FETCHER_TYPE="JWT",
        VMAGENT_TOKEN_FILE=str(etc / "istio-token"),
        CA_ADDR=mesh.address,
        ISTIOD_SAN="istiod.istio-system.svc",
        PROXY_CONFIG=json.dumps(config),
        POD_NAMESPACE=NAMESPACE,
        SERVICE_ACCOUNT=SERVICE_ACCOUNT,
        TRUST_DOMAIN="cluster.local",
        ISTIO_SVC_IP=ip,
        ISTIO_META_AUTO_REGISTER_GROUP=GROUP,
        ISTIO_META_DNS_CAPTURE="true",
        VMAGENT_CAPTURE="false",  # no iptables on the bench host
        ISTIO_META_CLUSTER_ID="Kubernetes",
        ISTIO_META_WORKLOAD_NAME=GROUP,
        ISTIO_METAJSON_LABELS=json.dumps({"app": GROUP}),
        VMAGENT_ENVOY="true" if envoy else "false",
        **extra,
    )
    return AgentHome(home, ip, status_port, env)


def vm_yaml(service_port: int = 8080) -> str:
    """The VM's WorkloadGroup (no probe: readiness is the agent's own) and a VIP service."""
    return f"""namespace: {NAMESPACE}
workloadGroups:
  - name: {GROUP}
    labels: {{app: {GROUP}}}
    serviceAccount: {SERVICE_ACCOUNT}
    template: {{ports: {{http: {service_port}}}}}
services:
  - host: {GROUP}.{NAMESPACE}.svc.cluster.local
    addresses: [10.96.1.10]
    ports: [{{name: http, port: {service_port}, protocol: HTTP}}]
    workloadSelector: {{app: {GROUP}}}
"""


def many_services_yaml(count: int, with_ports: bool) -> str:
    """``count`` Kubernetes services ``svc<i>.bench.svc.cluster.local`` with VIPs
    ``10.<hi>.<lo>.1`` (a NameTable of ``count`` entries); with a port each, Envoy also gets
    ``count`` clusters and routes."""
    lines = ["namespace: bench", "services:"]
    for i in range(count):
        lines.append(f"  - host: svc{i}.bench.svc.cluster.local")
        lines.append(f"    addresses: [10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}]")
        if with_ports:
            lines.append("    ports: [{name: http, port: 9080, protocol: HTTP}]")
    return "\n".join(lines) + "\n"


def process_tree_usage(pids: Sequence[int]) -> dict[int, tuple[int, float]]:
    """pid -> (RSS bytes, CPU seconds user+system) for each live pid (psutil)."""
    import psutil

    out: dict[int, tuple[int, float]] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            times = process.cpu_times()
            out[pid] = (process.memory_info().rss, times.user + times.system)
        except psutil.Error:
            continue
    return out
