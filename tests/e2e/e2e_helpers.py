"""Real processes for the end-to-end tests: ``vmagent devmesh serve`` and ``vmagent run`` as
separate processes talking gRPC + TLS over loopback, a dnsmasq upstream, and small probed apps.

Everything binds to 127.0.0.1, every wait is a bounded poll, and every process started here is
ended by :meth:`Processes.close` (the fixtures call it in teardown, also after a failure).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import dns.message
import dns.query
import dns.rdatatype
import yaml
from loopback import free_port

from vmagent.config import CLUSTER_ENV_VAR, DYNAMIC_PREFIXES, env_key, settings
from vmagent.devmesh.authority import Authority

LOOPBACK = "127.0.0.1"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "istio-onboarding"
NAMESPACE = "vm"
GROUP = "vm-web"
SERVICE_ACCOUNT = "vm-web"
VM_IP = "10.20.30.40"  # the VM's (fake) ISTIO_SVC_IP: only a name; probes go to localhost
ENTRY = f"{GROUP}-{VM_IP}"
GROUP_LABELS = {"app": "vm-web"}
TEMPLATE_LABELS = {"version": "v1"}
UPSTREAM_IP = "192.0.2.53"  # what dnsmasq says for up.e2e.test
# Probe timing for tests: every second, one result flips the state.
FAST = {"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 1, "successThreshold": 1}

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Waiting and ports


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``.
    Exceptions from ``check`` count as "not yet" (the last one is reported)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
        except Exception as exc:  # not there yet: connection refused, missing key, ...
            value, last = None, exc
        else:
            last = value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Proc:
    """A subprocess whose stdout/stderr go to files (so a full pipe never blocks it)."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; returns the code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def describe(self) -> str:
        return (
            f"--- {self.name} stdout ---\n{self.stdout()}\n--- {self.name} stderr ---\n"
            + (self.stderr()[-6000:])
        )


class Processes:
    """Starts processes into a work directory and ends them all on :meth:`close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self._count = 0

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> Proc:
        self._count += 1
        stem = self.workdir / f"{self._count:02d}-{name}"
        out, err = Path(f"{stem}.stdout"), Path(f"{stem}.stderr")
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(
                argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=dict(env)
            )
        proc = Proc(name, popen, out, err)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(proc.describe() for proc in self.procs)

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.kill() if proc.name == "dnsmasq" else proc.terminate(5)


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any setting vmagent reads (so the developer's shell cannot leak in)."""
    keys = {env_key(f) for f in settings()} | {CLUSTER_ENV_VAR}
    env = {
        k: v for k, v in os.environ.items() if k not in keys and not k.startswith(DYNAMIC_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# HTTP


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def http_json(url: str, method: str = "GET", timeout: float = 3.0) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return int(reply.status), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")


# ---------------------------------------------------------------------------------------------
# dnsmasq: the upstream resolver (never the machine's resolv.conf)


def start_dnsmasq(procs: Processes) -> str:
    """dnsmasq on a free loopback port, authoritative for ``cluster.local``, ``example.com``
    (so a name the agent does not know gets NXDOMAIN) and ``e2e.test``; returns
    ``127.0.0.1:PORT``."""
    exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    port = free_port()
    argv = [
        exe,
        "--conf-file=/dev/null",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        f"--user={pwd.getpwuid(os.getuid()).pw_name}",
        f"--pid-file={procs.workdir / 'dnsmasq.pid'}",
        f"--port={port}",
        f"--listen-address={LOOPBACK}",
        "--bind-interfaces",
        "--auth-zone=cluster.local",
        "--auth-zone=e2e.test",
        "--auth-zone=example.com",
        f"--auth-server=ns.e2e.test,{LOOPBACK}",
        f"--host-record=up.e2e.test,{UPSTREAM_IP}",
        "--auth-ttl=1",
        "--local-ttl=1",
    ]
    proc = procs.start("dnsmasq", argv, clean_env())
    wait_for(
        lambda: dns_query(f"{LOOPBACK}:{port}", "up.e2e.test") == [UPSTREAM_IP],
        10,
        "dnsmasq to answer",
    )
    assert proc.alive(), proc.describe()
    return f"{LOOPBACK}:{port}"


# ---------------------------------------------------------------------------------------------
# DNS clients


def _split(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return host, int(port)


def dns_answer(server: str, name: str, rdtype: str = "A") -> dns.message.Message:
    host, port = _split(server)
    return dns.query.udp(dns.message.make_query(name, rdtype), host, timeout=1.0, port=port)


def dns_query(server: str, name: str, rdtype: str = "A") -> list[str]:
    """The addresses answered for ``name`` (empty for NXDOMAIN / no records)."""
    reply = dns_answer(server, name, rdtype)
    want = dns.rdatatype.from_text(rdtype)
    return sorted(rr.to_text() for rrset in reply.answer if rrset.rdtype == want for rr in rrset)


def dig(server: str, name: str, rdtype: str = "A") -> tuple[str, list[str]]:
    """(status, addresses) from the real ``dig`` at ``server``."""
    host, port = _split(server)
    out = subprocess.run(
        ["dig", f"@{host}", "-p", str(port), name, rdtype, "+tries=1", "+time=1", "+nocookie"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout
    status = re.search(r"status: ([A-Z]+)", out)
    answers = re.findall(rf"^\S+\s+\d+\s+IN\s+{rdtype}\s+(\S+)$", out, re.MULTILINE)
    return (status.group(1) if status else "NO-ANSWER"), sorted(answers)


# ---------------------------------------------------------------------------------------------
# devmesh


def mesh_config(
    probe: Mapping[str, Any] | None = None, services: Iterable[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The devmesh config document for namespace ``vm``: the WorkloadGroup the agent registers
    into (with ``probe``), a VIP service and a headless one selecting it, plus ``services``."""
    group: dict[str, Any] = {
        "name": GROUP,
        "labels": GROUP_LABELS,
        "serviceAccount": SERVICE_ACCOUNT,
        "template": {"ports": {"http": 8080}, "labels": TEMPLATE_LABELS},
    }
    if probe is not None:
        group["probe"] = dict(probe)
    return {
        "namespace": NAMESPACE,
        "workloadGroups": [group],
        "services": [
            {
                "host": "web.vm.svc.cluster.local",
                "addresses": ["10.96.1.10"],
                "ports": [{"name": "http", "port": 8080, "protocol": "HTTP"}],
                "workloadSelector": GROUP_LABELS,
            },
            *services,
        ],
    }


def write_yaml(path: Path, document: Mapping[str, Any]) -> None:
    """Write atomically (devmesh polls the directory and must never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(dict(document), sort_keys=False))
    os.replace(tmp, path)


_LISTENING = re.compile(r"devmesh listening on (\S+) .*debug: (\S+)")


@dataclass
class Devmesh:
    procs: Processes
    config_dir: Path
    keys_dir: Path
    grace: str = "2s"
    address: str = ""
    debug_url: str = ""
    proc: Proc | None = None

    def start(self, listen: str = f"{LOOPBACK}:0", debug_listen: str = f"{LOOPBACK}:0") -> None:
        argv = [
            sys.executable, "-m", "vmagent", "devmesh", "serve",
            "--config", str(self.config_dir),
            "--dir", str(self.keys_dir),
            "--listen", listen,
            "--debug-listen", debug_listen,
            "--grace", self.grace,
            "--poll", "100ms",
        ]  # fmt: skip
        proc = self.procs.start("devmesh", argv, clean_env())
        self.proc = proc

        def listening() -> re.Match[str] | None:
            if not proc.alive():
                raise AssertionError(f"devmesh exited with {proc.popen.returncode}")
            return _LISTENING.search(proc.stdout())

        try:
            match = wait_for(listening, 20, "devmesh to listen", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{proc.describe()}") from None
        self.address, self.debug_url = match.group(1), match.group(2)

    def restart(self) -> None:
        """Start again on the same gRPC and debug ports (after :meth:`kill` or :meth:`stop`)."""
        debug = self.debug_url.removeprefix("http://")
        wait_for(lambda: _bindable(self.address), 10, f"{self.address} to be free again")
        self.start(self.address, debug)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()

    @property
    def root_cert(self) -> Path:
        return self.keys_dir / "root-cert.pem"

    def mint_token(self, namespace: str, service_account: str, ttl: float = 3600) -> str:
        authority = Authority.load_or_create(str(self.keys_dir), "cluster.local", time.time())
        return authority.mint_token(namespace, service_account, time.time(), ttl)

    def get(self, path: str) -> Any:
        status, body = http_json(self.debug_url + path)
        assert status == 200, (path, status, body)
        return body

    def entries(self) -> list[dict[str, Any]]:
        registry = self.get("/debug/registry")
        found: list[dict[str, Any]] = registry["workloadEntries"]
        return found

    def entry(self, name: str = ENTRY) -> dict[str, Any] | None:
        return next((e for e in self.entries() if e["metadata"]["name"] == name), None)

    def wait_health(self, healthy: bool, name: str = ENTRY, timeout: float = 10) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            entry = self.entry(name)
            return entry if entry is not None and entry.get("healthy") is healthy else None

        return wait_for(check, timeout, f"WorkloadEntry {name} healthy={healthy}", interval=0.1)


def _bindable(address: str) -> bool:
    host, port = _split(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The agent


@dataclass
class Agent:
    """``vmagent run`` onboarded into devmesh's group ``vm/vm-web``, with its DNS proxy and
    status endpoint on free loopback ports and every directory under ``home``."""

    procs: Processes
    home: Path
    mesh: Devmesh
    upstream: str
    probe: Mapping[str, Any] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    onboarding: Path | None = None  # a directory with istioctl's cluster.env and mesh.yaml
    proxy_config: dict[str, Any] = field(default_factory=dict)  # more PROXY_CONFIG fields
    dns: str = ""
    status_url: str = ""
    proc: Proc | None = None

    def __post_init__(self) -> None:
        self.dns = f"{LOOPBACK}:{free_port()}"
        self.status_url = f"http://{LOOPBACK}:{free_port()}"
        for sub in ("etc", "state", "run"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)

    @property
    def etc(self) -> Path:
        return self.home / "etc"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    def prepare(self, namespace: str = NAMESPACE, service_account: str = SERVICE_ACCOUNT) -> None:
        """The files an onboarded VM has: the mesh's root cert and a bootstrap token."""
        shutil.copyfile(self.mesh.root_cert, self.etc / "root-cert.pem")
        token = self.etc / "istio-token"
        token.write_text(self.mesh.mint_token(namespace, service_account))
        token.chmod(0o600)
        resolv = self.home / "resolv.conf"
        resolv.write_text("# e2e: no nameservers here; VMAGENT_DNS_UPSTREAMS is the upstream\n")

    def env(self) -> dict[str, str]:
        """Paths, ports, addresses and credentials; the workload's identity and metadata come
        from ``onboarding`` (istioctl's cluster.env + mesh.yaml, unchanged) when set, else
        from the environment, as ``vmagent dev`` sets them."""
        proxy_config: dict[str, Any] = {"discoveryAddress": self.mesh.address}
        if self.probe is not None:
            proxy_config["readinessProbe"] = dict(self.probe)
        proxy_config.update(self.proxy_config)
        env = clean_env(
            VMAGENT_CONFIG_DIR=str(self.etc),
            VMAGENT_STATE_DIR=str(self.state_dir),
            VMAGENT_RUN_DIR=str(self.home / "run"),
            VMAGENT_STATUS_ADDR=self.status_url.removeprefix("http://"),
            VMAGENT_RESOLV_CONF=str(self.home / "resolv.conf"),
            VMAGENT_DNS_UPSTREAMS=self.upstream,
            DNS_PROXY_ADDR=self.dns,
            OUTPUT_CERTS=str(self.state_dir / "certs"),
            CREDENTIAL_FETCHER_TYPE="JWT",
            VMAGENT_TOKEN_FILE=str(self.etc / "istio-token"),
            CA_ADDR=self.mesh.address,
            ISTIOD_SAN="istiod.istio-system.svc",
            PROXY_CONFIG=json.dumps(proxy_config),
            # Envoy only where a test asks for it (test_e2e_envoy.py, in a network namespace
            # of its own: devmesh's listeners use the fixed ports 15001/15006).
            VMAGENT_ENVOY="false",
            # No iptables on the test host (test_e2e_two_vms.py captures in its namespaces).
            VMAGENT_CAPTURE="false",
        )
        if self.onboarding is not None:
            env[CLUSTER_ENV_VAR] = str(self.onboarding / "cluster.env")
            if (self.onboarding / "mesh.yaml").exists():
                env["VMAGENT_MESH_CONFIG"] = str(self.onboarding / "mesh.yaml")
        else:
            env.update(
                VMAGENT_CLUSTER_ENV=os.devnull,
                VMAGENT_MESH_CONFIG=os.devnull,
                POD_NAMESPACE=NAMESPACE,
                SERVICE_ACCOUNT=SERVICE_ACCOUNT,
                TRUST_DOMAIN="cluster.local",
                ISTIO_SVC_IP=VM_IP,
                ISTIO_META_AUTO_REGISTER_GROUP=GROUP,
                ISTIO_META_DNS_CAPTURE="true",
                ISTIO_META_CLUSTER_ID="Kubernetes",
                ISTIO_META_WORKLOAD_NAME=GROUP,
                ISTIO_METAJSON_LABELS=json.dumps({"node-label": "from-vm"}),
            )
        env.update(self.extra_env)
        return env

    def start(self) -> Proc:
        argv = [sys.executable, "-m", "vmagent", "run"]
        self.proc = self.procs.start("agent", argv, self.env())
        return self.proc

    def status(self) -> dict[str, Any]:
        status, body = http_json(self.status_url + "/status")
        assert status == 200, body
        result: dict[str, Any] = body
        return result

    def ready(self) -> bool:
        return http_get(self.status_url + "/healthz/ready")[0] == 200

    def wait_ready(self, timeout: float = 20) -> None:
        def check() -> bool:
            if self.proc is not None and not self.proc.alive():
                raise AssertionError(f"agent exited with {self.proc.popen.returncode}")
            return self.ready()

        try:
            wait_for(check, timeout, "the agent's /healthz/ready", interval=0.1)
        except AssertionError as exc:
            logs = self.proc.describe() if self.proc else ""
            raise AssertionError(f"{exc}\n{logs}") from None

    def resolve(self, name: str) -> list[str]:
        return dns_query(self.dns, name)

    def wait_resolves(self, name: str, addresses: list[str], timeout: float = 5) -> None:
        wait_for(lambda: self.resolve(name) == addresses, timeout, f"{name} -> {addresses}")


# ---------------------------------------------------------------------------------------------
# Probed apps: the VM's workload, flipped between healthy and unhealthy by the tests


class HttpApp:
    """An HTTP server on 127.0.0.1 answering every GET with :attr:`code`."""

    def __init__(self, code: int = 200) -> None:
        self.code = code
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"status {app.code}\n".encode()
                self.send_response(app.code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpPort:
    """A TCP port on 127.0.0.1 that the test opens (listening) and closes (refused)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._sock: socket.socket | None = None

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self.port))
        sock.listen(64)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class GrpcHealthApp:
    """A real gRPC server with ``grpc.health.v1.Health`` on 127.0.0.1."""

    def __init__(self, service: str = "") -> None:
        from concurrent import futures

        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        self._pb2 = health_pb2
        self.service = service
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = int(self.server.add_insecure_port(f"{LOOPBACK}:0"))
        self.server.start()

    def set_serving(self, serving: bool) -> None:
        status = self._pb2.HealthCheckResponse
        self.health.set(self.service, status.SERVING if serving else status.NOT_SERVING)

    def close(self) -> None:
        self.server.stop(0)


def exec_probe_script(directory: Path) -> tuple[Path, Path]:
    """A real script for an ``exec`` probe: it exits with the code written in the returned
    control file. Returns (script, control file)."""
    control = directory / "exit-code"
    control.write_text("0\n")
    script = directory / "check.sh"
    script.write_text(f'#!/bin/sh\nexit "$(cat {control})"\n')
    script.chmod(0o755)
    return script, control


# ---------------------------------------------------------------------------------------------
# One test's world


class World:
    """What a test builds on: its processes, a dnsmasq upstream, devmesh and agents."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.procs = Processes(tmp_path)
        self._upstream = ""
        self.config_dir = tmp_path / "mesh-config"
        self.config_dir.mkdir()

    @property
    def upstream(self) -> str:
        if not self._upstream:
            self._upstream = start_dnsmasq(self.procs)
        return self._upstream

    def devmesh(
        self,
        probe: Mapping[str, Any] | None = None,
        services: Iterable[Mapping[str, Any]] = (),
        grace: str = "2s",
    ) -> Devmesh:
        """devmesh with the ``vm`` namespace config (``vm.yaml``), started."""
        write_yaml(self.config_dir / "vm.yaml", mesh_config(probe, services))
        mesh = Devmesh(self.procs, self.config_dir, self.tmp / "devmesh-keys", grace=grace)
        mesh.start()
        return mesh

    def agent(
        self,
        mesh: Devmesh,
        probe: Mapping[str, Any] | None = None,
        home: str = "agent",
        onboarding: Path | None = None,
        token_for: tuple[str, str] = (NAMESPACE, SERVICE_ACCOUNT),
        **extra_env: str,
    ) -> Agent:
        """An onboarded agent (root cert, a token for ``token_for`` = (namespace, service
        account)), not started yet."""
        agent = Agent(
            self.procs, self.tmp / home, mesh, self.upstream, probe, dict(extra_env), onboarding
        )
        agent.prepare(*token_for)
        return agent

    def close(self) -> None:
        self.procs.close()


# ---------------------------------------------------------------------------------------------
# A network namespace of the test's own (Envoy's listeners use fixed ports)

CLONE_NEWNET = 0x40000000  # <linux/sched.h>


def netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "a network namespace of the test's own needs root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


@contextlib.contextmanager
def own_network_namespace() -> Iterator[str]:
    """Move the calling thread into a fresh network namespace (loopback up) until exit: every
    socket it opens and every process it starts from then on lives there, so fixed ports (the
    15001/15006 listeners devmesh sends Envoy) cannot collide with anything else on the
    machine. Removed afterwards. Needs root (see :func:`netns_skip_reason`)."""
    name = f"vme2e-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {name}")
        finally:
            os.close(target)
        try:
            yield name
        finally:
            libc.setns(original, CLONE_NEWNET)
    finally:
        os.close(original)
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
