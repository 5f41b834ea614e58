"""Helpers for the capture tests: two network namespaces (VM and client) joined by a veth,
dnsmasq as the VM's resolv.conf nameserver, processes run as the exempt uid 1337.

Everything is created by the test and removed afterwards (namespaces, /etc/netns/<name>).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROXY_ID = "1337"
NAMESERVER = "127.0.0.53"  # like systemd-resolved's stub: the loop case of istio/istio#30309
VM_ADDR, CLIENT_ADDR = "10.77.0.1", "10.77.0.2"
SERVICE_CIDR, SERVICE_IP = "10.96.0.0/16", "10.96.0.10"
INBOUND_PORT = 8080
MESH_NAME, MESH_IP = "productpage.ns1.svc.cluster.local", "9.9.9.9"
UPSTREAM_NAME, UPSTREAM_IP = "www.up.test", "10.0.0.1"

# Accepts on the ports in argv and answers each connection "<port> <original destination>"
# (what Envoy sees through SO_ORIGINAL_DST), or "<port> direct" when it was not redirected.
LISTENER = r"""
import socket, selectors, struct, sys
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(8); sel.register(s, selectors.EVENT_READ, port)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        try:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
            port, ip = struct.unpack("!2xH4s8x", raw)
            where = f"{socket.inet_ntoa(ip)}:{port}"
        except OSError:
            where = "direct"
        conn.sendall(f"{key.data} {where}\n".encode()); conn.close()
"""


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and iptables need root"
    for tool in ("ip", "iptables-restore", "iptables-save", "dig", "dnsmasq", "setpriv"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (scripts/setup --test installs it)"
    return None


@dataclass
class Netns:
    name: str

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(
        self, *argv: str, env: dict[str, str] | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix(), *argv],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            input=input,
        )

    def check(self, *argv: str) -> str:
        done = self.run(*argv)
        assert done.returncode == 0, f"{argv}: {done.stderr}"
        return done.stdout

    def save(self) -> str:
        """iptables-save and ip6tables-save without comments and counters: the rules."""
        lines = []
        for tool in ("iptables-save", "ip6tables-save"):
            for line in self.check(tool).splitlines():
                if not line.startswith("#"):
                    lines.append(line.split(" [")[0] if line.startswith(":") else line)
        return "\n".join(lines)

    def dig(self, *args: str) -> str:
        return self.run("dig", "+short", "+time=1", "+tries=1", *args).stdout.strip()


@contextmanager
def namespaces() -> Iterator[tuple[Netns, Netns]]:
    """(vm, client): VM at 10.77.0.1 (the service CIDR routed to eth0), client at 10.77.0.2."""
    tag = uuid.uuid4().hex[:6]
    vm, client = Netns(f"vmcap-{tag}"), Netns(f"vmcapc-{tag}")
    etc = Path("/etc/netns") / vm.name
    made: list[Netns] = []
    try:
        for ns in (vm, client):
            subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
            made.append(ns)
            subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text(f"nameserver {NAMESERVER}\n")
        veth = f"vc{tag}"
        for cmd in (
            ["ip", "-n", vm.name, "link", "add", "eth0", "type", "veth", "peer", veth],
            ["ip", "-n", vm.name, "link", "set", veth, "netns", client.name],
            ["ip", "-n", client.name, "link", "set", veth, "name", "eth0"],
            ["ip", "-n", vm.name, "addr", "add", f"{VM_ADDR}/24", "dev", "eth0"],
            ["ip", "-n", client.name, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0"],
            ["ip", "-n", vm.name, "link", "set", "eth0", "up"],
            ["ip", "-n", client.name, "link", "set", "eth0", "up"],
            ["ip", "-n", vm.name, "route", "add", SERVICE_CIDR, "dev", "eth0"],
            # A "service" the client answers for directly, for the exclusions.
            ["ip", "-n", client.name, "addr", "add", f"{SERVICE_IP}/32", "dev", "eth0"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        yield vm, client
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)


class Procs:
    """Started processes, killed at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def as_proxy(argv: Sequence[str]) -> list[str]:
    """``argv`` run as the exempt uid/gid (Envoy and the agent run so)."""
    return ["setpriv", f"--reuid={PROXY_ID}", f"--regid={PROXY_ID}", "--clear-groups", *argv]


def vmagent_env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "VMAGENT_"))}
    env.update(
        VMAGENT_CLUSTER_ENV="/dev/null",
        VMAGENT_RUN_DIR=str(workdir / "run"),
        VMAGENT_STATE_DIR=str(workdir / "state"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def vmagent(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmagent", *args]


def wait_until(what: str, check: object, timeout: float = 15.0) -> float:
    """Poll ``check()`` (bounded); returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")
