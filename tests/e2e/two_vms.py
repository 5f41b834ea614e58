"""Two VMs and a mesh in network namespaces the caller creates (test_e2e_two_vms.py and
bench/two_vms_bench.py): the calling thread moves into the "mesh" namespace (bridge ``br0``,
10.77.0.1: devmesh, and dnsmasq as the VMs' normal resolver), and each VM gets a namespace
of its own joined to the bridge by a veth, with ``/etc/netns/<name>/resolv.conf`` naming
10.77.0.1. Each VM runs ``vmagent run`` with capture (DNS, ``ISTIO_SERVICE_CIDR``,
``ISTIO_INBOUND_PORTS=8080``) and real Envoy. VM-B runs a small HTTP app on 8080.

- VM-A: ``vmagent run`` as root: the agent applies the capture and takes gid 1337.
- VM-B: the Istio VM way: ``vmagent capture apply`` as root, then ``vmagent run`` as 1337.

Everything is removed by :meth:`TwoVms.close` (processes, the watchdogs via ``capture clean``,
namespaces, ``/etc/netns`` dirs). Addresses exist only inside these namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vmagent.devmesh.authority import Authority

MESH_IP = "10.77.0.1"
VM_IPS = {"a": "10.77.0.2", "b": "10.77.0.3"}
SERVICE_CIDR = "10.96.0.0/16"
BACKEND_VIP = "10.96.2.10"
NS = "two"
BACKEND = f"backend.{NS}.svc.cluster.local"
UPSTREAM_NAME, UPSTREAM_IP = "up.two.test", "192.0.2.80"  # answered by the "normal" resolver
PROXY_ID = "1337"
APP_UID = "4242"  # the application's (captured) user
GROUPS = {"a": "client", "b": "backend"}

DIRECT_PORT = 8081  # VM-B's app also answers here, outside the capture (ISTIO_INBOUND_PORTS)
# VM-B's workload: /healthz is 200 unless <dir>/sick exists; anything else answers JSON with
# the x-forwarded-client-cert header; each request is counted in <dir>/hits.
APP = r"""
import json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
d = sys.argv[1]; lock = threading.Lock(); hits = [0]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/healthz":
            code, body = (503, b"sick") if os.path.exists(d + "/sick") else (200, b"ok")
        else:
            with lock:
                hits[0] += 1
                open(d + "/hits", "w").write(str(hits[0]))
            code = 200
            body = json.dumps({"xfcc": self.headers.get("x-forwarded-client-cert")}).encode()
        # One write: headers and body apart meet Nagle + delayed ACK (40 ms) behind Envoy.
        head = f"HTTP/1.1 {code} X\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        self.wfile.write(head + body)
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 128
direct = ThreadingHTTPServer(("0.0.0.0", DIRECT_PORT), H)  # not captured: the bench's baseline
threading.Thread(target=direct.serve_forever, daemon=True).start()
ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
""".replace("DIRECT_PORT", str(DIRECT_PORT))


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and iptables need root"
    for tool in ("ip", "iptables-restore", "dnsmasq", "setpriv", "curl", "dig"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (scripts/setup --test installs it)"
    return None


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr}")
    return done


def wait_until(what: str, check: Any, timeout: float = 20.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


def mesh_yaml(period: int = 1) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": period}
    return {
        "namespace": NS,
        "workloadGroups": [
            {
                "name": "client",
                "labels": {"app": "client"},
                "serviceAccount": "client",
                "template": {"ports": {"http": 8080}},
            },
            {
                "name": "backend",
                "labels": {"app": "backend"},
                "serviceAccount": "backend",
                "template": {"ports": {"http": 8080}},
                "probe": {**probe, "failureThreshold": 1},
            },
        ],
        "services": [
            {
                "host": BACKEND,
                "addresses": [BACKEND_VIP],
                "ports": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
                "workloadSelector": {"app": "backend"},
            }
        ],
    }


@dataclass
class Vm:
    key: str  # "a" | "b"
    netns: str
    home: Path
    agent: subprocess.Popen[bytes] | None = None

    @property
    def ip(self) -> str:
        return VM_IPS[self.key]

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix(), *argv], capture_output=True, text=True, timeout=timeout
        )

    def as_app(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``argv`` as the application's user (not exempt: captured)."""
        priv = ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups"]
        return self.run(*priv, *argv, timeout=timeout)

    def curl(self, url: str, timeout: float = 5) -> tuple[int, str]:
        """(HTTP status, body) of ``curl url`` as the app's user; status 0: no answer."""
        done = self.as_app(
            "curl", "-s", "-m", str(timeout), "-w", "\n%{http_code}", url, timeout=timeout + 5
        )
        body, _, code = done.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def dig(self, name: str) -> str:
        done = self.as_app("dig", "+short", "+time=1", "+tries=1", name)
        return done.stdout.strip()

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://{self.ip}:15020/status", timeout=2) as resp:
                result: dict[str, Any] = json.load(resp)
                return result
        except (OSError, ValueError):
            return None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.ip}:15020/healthz/ready", timeout=2):
                return True
        except OSError:
            return False

    def log(self) -> str:
        path = self.home / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class TwoVms:
    """Build with :meth:`build` (the calling thread must already be in a fresh namespace of its
    own, e.g. e2e_helpers.own_network_namespace()), then :meth:`start`; :meth:`close` always."""

    work: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    vms: dict[str, Vm] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def create(cls) -> TwoVms:
        work = Path(tempfile.mkdtemp(prefix="vm2-"))
        work.chmod(0o755)  # uid 1337 (VM-B's agent) reads below it
        return cls(work)

    # --- topology ---

    def build(self) -> None:
        sh("ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "addr", "add", f"{MESH_IP}/24", "dev", "br0")
        sh("ip", "link", "set", "br0", "up")
        for key, ip in VM_IPS.items():
            vm = Vm(key, f"vm2{key}-{self.tag}", self.work / f"vm-{key}")
            sh("ip", "netns", "add", vm.netns)
            self.vms[key] = vm
            etc = Path("/etc/netns") / vm.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(
                f"nameserver {MESH_IP}\nsearch {NS}.svc.cluster.local\n"
            )
            peer = f"v{key}{self.tag}"
            sh("ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", vm.netns)
            sh("ip", "link", "set", peer, "master", "br0", "up")
            n = ["ip", "-n", vm.netns]
            sh(*n, "link", "set", "lo", "up")
            sh(*n, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh(*n, "link", "set", "eth0", "up")
            sh(*n, "route", "add", SERVICE_CIDR, "dev", "eth0")

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        with (self.work / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=cwd
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- the mesh ---

    def start_mesh(self) -> None:
        exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        self.spawn("dnsmasq", [
            exe, "--conf-file=/dev/null", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--user=root", f"--pid-file={self.work / 'dnsmasq.pid'}",
            f"--listen-address={MESH_IP}", "--bind-interfaces",
            f"--host-record={UPSTREAM_NAME},{UPSTREAM_IP}",
        ])  # fmt: skip
        config = self.work / "mesh-config"
        config.mkdir()
        (config / "two.yaml").write_text(yaml.safe_dump(mesh_yaml()))
        self.keys = self.work / "keys"
        env = _clean_env()
        self.spawn("devmesh", [
            sys.executable, "-m", "vmagent", "devmesh", "serve", "--config", str(config),
            "--dir", str(self.keys), "--listen", f"{MESH_IP}:15012",
            "--debug-listen", f"{MESH_IP}:15014", "--grace", "30s", "--poll", "100ms",
        ], env)  # fmt: skip
        wait_until("devmesh listening", lambda: "devmesh listening" in self.log("devmesh"), 30)

    def registry(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://{MESH_IP}:15014/debug/registry", timeout=3) as r:
            entries: list[dict[str, Any]] = json.load(r)["workloadEntries"]
            return entries

    def entry(self, key: str) -> dict[str, Any] | None:
        name = f"{GROUPS[key]}-{VM_IPS[key]}"
        return next((e for e in self.registry() if e["metadata"]["name"] == name), None)

    # --- the VMs ---

    def agent_env(self, vm: Vm, **extra: str) -> dict[str, str]:
        group = GROUPS[vm.key]
        probe = {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1,
                 "timeoutSeconds": 1, "failureThreshold": 1, "successThreshold": 1}  # fmt: skip
        proxy_config: dict[str, Any] = {
            "discoveryAddress": f"{MESH_IP}:15012",
            "terminationDrainDuration": "1s",
        }
        if vm.key == "b":
            proxy_config["readinessProbe"] = probe
        env = _clean_env(
            VMAGENT_CONFIG_DIR=str(vm.home / "etc"),
            VMAGENT_STATE_DIR=str(vm.home / "state"),
            VMAGENT_RUN_DIR=str(vm.home / "run"),
            VMAGENT_STATUS_ADDR=f"{vm.ip}:15020",
            VMAGENT_CLUSTER_ENV=os.devnull,
            VMAGENT_MESH_CONFIG=os.devnull,
            OUTPUT_CERTS=str(vm.home / "state" / "certs"),
            CREDENTIAL_FETCHER_TYPE="JWT",
            VMAGENT_TOKEN_FILE=str(vm.home / "etc" / "istio-token"),
            CA_ADDR=f"{MESH_IP}:15012",
            ISTIOD_SAN="istiod.istio-system.svc",
            PROXY_CONFIG=json.dumps(proxy_config),
            POD_NAMESPACE=NS,
            SERVICE_ACCOUNT=group,
            TRUST_DOMAIN="cluster.local",
            ISTIO_SVC_IP=vm.ip,
            ISTIO_META_AUTO_REGISTER_GROUP=group,
            ISTIO_META_CLUSTER_ID="Kubernetes",
            ISTIO_META_WORKLOAD_NAME=group,
            ISTIO_METAJSON_LABELS=json.dumps({"app": group}),
            # The capture (Istio's cluster.env keys).
            ISTIO_META_DNS_CAPTURE="true",
            ISTIO_SERVICE_CIDR=SERVICE_CIDR,
            ISTIO_INBOUND_PORTS="8080",
            PROXY_UID=PROXY_ID,
            PROXY_GID=PROXY_ID,
            VMAGENT_ENVOY="true",
        )
        env.update(extra)
        return env

    def agent_env_plain(self) -> dict[str, str]:
        """VM-B's settings (capture asked for) in a home uid 1337 owns, without Envoy and with
        the status endpoint on loopback, for a ``vmagent run`` that is refused before any
        network is needed."""
        vm = Vm("b", "", self.work / "plain")
        for sub in ("etc", "state", "run"):
            (vm.home / sub).mkdir(parents=True, exist_ok=True)
        sh("chown", "-R", f"{PROXY_ID}:{PROXY_ID}", str(vm.home))
        return self.agent_env(vm, VMAGENT_ENVOY="false", VMAGENT_STATUS_ADDR="127.0.0.1:15020")

    def prepare_vm(self, vm: Vm, token_ttl: float = 3600) -> None:
        for sub in ("etc", "state", "run"):
            (vm.home / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.keys / "root-cert.pem", vm.home / "etc" / "root-cert.pem")
        authority = Authority.load_or_create(str(self.keys), "cluster.local", time.time())
        token = vm.home / "etc" / "istio-token"
        token.write_text(authority.mint_token(NS, GROUPS[vm.key], time.time(), token_ttl))
        token.chmod(0o600)
        if vm.key == "b":
            sh("chown", "-R", f"{PROXY_ID}:{PROXY_ID}", str(vm.home))

    def start_agent(self, vm: Vm, **extra: str) -> None:
        env = self.agent_env(vm, **extra)
        argv = [*vm.prefix()]
        if vm.key == "b":  # Istio's VM way: capture as root, the agent as the exempt user
            done = subprocess.run(
                [*vm.prefix(), sys.executable, "-m", "vmagent", "capture", "apply"],
                env=env, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            argv += ["setpriv", f"--reuid={PROXY_ID}", f"--regid={PROXY_ID}", "--clear-groups"]
        argv += [sys.executable, "-m", "vmagent", "run"]
        with (vm.home / "agent.log").open("ab") as out:
            vm.agent = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
            )
        self.procs.append(vm.agent)

    def start_app(self, vm: Vm) -> None:
        app = self.work / "app"
        app.mkdir(exist_ok=True)
        app.chmod(0o777)
        (self.work / "app.py").write_text(APP)
        self.spawn("app", [
            *vm.prefix(), "setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}",
            "--clear-groups", sys.executable, str(self.work / "app.py"), str(app),
        ])  # fmt: skip

    def hits(self) -> int:
        path = self.work / "app" / "hits"
        return int(path.read_text() or 0) if path.exists() else 0

    def set_sick(self, sick: bool) -> None:
        path = self.work / "app" / "sick"
        if sick:
            path.write_text("")
        else:
            path.unlink(missing_ok=True)

    def start(self, token_ttl: float = 3600, **agent_env: str) -> None:
        """devmesh, dnsmasq, the app and both agents; returns once both are ready."""
        self.start_mesh()
        for vm in self.vms.values():
            self.prepare_vm(vm, token_ttl)
        self.start_app(self.vms["b"])
        for vm in self.vms.values():
            self.start_agent(vm, **agent_env)
        for vm in self.vms.values():
            wait_until(f"VM-{vm.key} agent ready", lambda v=vm: self._ready(v), 60)

    def _ready(self, vm: Vm) -> bool:
        if vm.agent is not None and vm.agent.poll() is not None:
            raise AssertionError(f"VM-{vm.key} agent exited {vm.agent.returncode}:\n{vm.log()}")
        return vm.ready()

    # --- teardown ---

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for vm in self.vms.values():  # stops the detached DNS watchdogs too
            subprocess.run(
                [*vm.prefix(), sys.executable, "-m", "vmagent", "capture", "clean"],
                env=self.agent_env(vm), capture_output=True, timeout=30,
            )  # fmt: skip
            sh("ip", "netns", "del", vm.netns, check=False)
            shutil.rmtree(Path("/etc/netns") / vm.netns, ignore_errors=True)
        sh("ip", "link", "del", "br0", check=False)
        shutil.rmtree(self.work, ignore_errors=True)

    def logs(self) -> str:
        parts = [f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
                 for p in sorted(self.work.glob("*.log"))]  # fmt: skip
        parts += [f"--- VM-{vm.key} agent ---\n{vm.log()[-6000:]}" for vm in self.vms.values()]
        return "\n".join(parts)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ISTIO_", "VMAGENT_", "PROXY_", "DNS_", "CA_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
