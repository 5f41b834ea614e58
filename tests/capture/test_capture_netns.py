"""Capture for real, in namespaces the test creates: DNS to the resolv.conf nameserver answered
by vmagent, no loop for vmagent's own upstream queries, outbound to the service CIDR at 15001,
inbound from another namespace at 15006; ``kill -9`` of the DNS proxy → the watchdog fails
DNS open within seconds; a restarted proxy gets DNS back; ``clean`` restores iptables exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from capture_netns import (
    INBOUND_PORT,
    LISTENER,
    MESH_IP,
    MESH_NAME,
    NAMESERVER,
    PROXY_ID,
    SERVICE_CIDR,
    SERVICE_IP,
    UPSTREAM_IP,
    UPSTREAM_NAME,
    VM_ADDR,
    Netns,
    Procs,
    as_proxy,
    namespaces,
    skip_reason,
    vmagent,
    vmagent_env,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

TABLE = {
    "table": {
        MESH_NAME: {
            "ips": [MESH_IP],
            "registry": "Kubernetes",
            "shortname": "productpage",
            "namespace": "ns1",
        }
    }
}
FOREIGN_RULES = (
    "*raw\n-A PREROUTING -p udp --dport 9 -j ACCEPT\nCOMMIT\n"
    "*nat\n-A OUTPUT -p tcp --dport 9 -j RETURN\n-A PREROUTING -p tcp --dport 9 -j RETURN\n"
    "COMMIT\n"
)
CONNECT = (
    "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5);"
    " print(s.makefile().readline().strip())"
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Readable by uid 1337 (pytest's tmp_path is root-only).
    path = Path(tempfile.mkdtemp(prefix="vmcapture-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _dnsmasq(vm: Netns, procs: Procs, workdir: Path) -> None:
    exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    procs.start(
        "dnsmasq",
        [
            *vm.prefix(), exe, "--conf-file=/dev/null", "--keep-in-foreground", "--no-resolv",
            "--no-hosts", "--user=root", f"--pid-file={workdir / 'dnsmasq.pid'}",
            f"--listen-address={NAMESERVER}", "--bind-interfaces", "--log-queries",
            f"--log-facility={workdir / 'dnsmasq-queries.log'}",
            f"--host-record={UPSTREAM_NAME},{UPSTREAM_IP}",
        ],
    )  # fmt: skip
    wait_until("dnsmasq answers", lambda: vm.dig(f"@{NAMESERVER}", UPSTREAM_NAME) == UPSTREAM_IP)


def _dns_proxy(vm: Netns, procs: Procs, workdir: Path, name: str) -> int:
    argv = vmagent(
        "dns", "serve", "--name-table", str(workdir / "table.json"),
        "--listen", "127.0.0.1:15053", "--upstream", f"{NAMESERVER}:53",
        "--search", "ns1.svc.cluster.local", "--namespace", "ns1",
    )  # fmt: skip
    proc = procs.start(name, [*vm.prefix(), *as_proxy(argv)], env=vmagent_env(workdir))
    wait_until(
        "vmagent dns serve answers on 127.0.0.1:15053",
        lambda: vm.dig("@127.0.0.1", "-p", "15053", MESH_NAME) == MESH_IP,
    )
    return proc.pid


def _watchdog_pid(workdir: Path) -> int:
    pid = int((workdir / "run" / "capture-watch.pid").read_text())
    assert _alive(pid)
    return pid


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _connect(ns: Netns, host: str, port: int, as_exempt: bool = False) -> str:
    argv = [os.path.realpath(sys.executable), "-c", CONNECT, host, str(port)]
    done = ns.run(*(as_proxy(argv) if as_exempt else argv))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_capture_dns_outbound_inbound_failopen_and_clean(workdir: Path) -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    (workdir / "table.json").write_text(json.dumps(TABLE))
    (workdir / "run").mkdir()
    (workdir / "listener.py").write_text(LISTENER)
    env = vmagent_env(
        workdir,
        ISTIO_META_DNS_CAPTURE="true",
        ISTIO_SERVICE_CIDR=SERVICE_CIDR,
        ISTIO_INBOUND_PORTS=str(INBOUND_PORT),
        ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE="81",
        PROXY_UID=PROXY_ID,
        PROXY_GID=PROXY_ID,
    )
    procs = Procs(workdir)
    try:
        with namespaces() as (vm, client):
            # Rules of the VM's own in the chains capture hooks into: kept, in place.
            for tool in ("iptables-restore", "ip6tables-restore"):
                done = vm.run(tool, "--noflush", input=FOREIGN_RULES)
                assert done.returncode == 0, done.stderr
            before = vm.save()
            assert "-A OUTPUT -p tcp -m tcp --dport 9 -j RETURN" in before
            _dnsmasq(vm, procs, workdir)
            python = os.path.realpath(vmagent()[0])
            listener = [python, str(workdir / "listener.py")]
            procs.start("listener", [*vm.prefix(), *as_proxy([*listener, "15001", "15006"])])
            procs.start("direct", [*client.prefix(), *listener, "80", "81"])
            for name in ("listener", "direct"):
                wait_until(f"{name} ready", lambda n=name: "ready" in procs.log(n))

            # `show` prints the transaction and changes nothing. With no DNS proxy yet, apply
            # would leave the DNS redirect out (fail-open).
            redirect = "-A VMAGENT_DNS -p udp --dport 53 -d 127.0.0.53/32 -j REDIRECT"
            shown = vm.run(*vmagent("capture", "show"), env=env)
            assert shown.returncode == 0, shown.stderr
            assert "-A OUTPUT -j VMAGENT_OUTPUT" in shown.stdout
            assert redirect not in shown.stdout and "fail-open" in shown.stdout
            forced = vm.run(*vmagent("capture", "show", "--no-watchdog"), env=env)
            assert redirect in forced.stdout
            assert vm.save() == before

            # Nothing captured yet: the mesh name is unknown to the host's resolver.
            assert vm.dig(MESH_NAME) == ""

            # Applied before the agent runs (as istio-iptables before pilot-agent): no DNS
            # redirect to a port nobody serves; the host resolver keeps working.
            applied = vm.run(*vmagent("capture", "apply"), env=env)
            assert applied.returncode == 0, applied.stderr
            assert "VMAGENT_OUTPUT" in vm.save() and "VMAGENT_DNS" not in vm.save()
            assert vm.dig(UPSTREAM_NAME) == UPSTREAM_IP
            # The agent's DNS proxy starts (as uid 1337): DNS capture follows within seconds.
            proxy_pid = _dns_proxy(vm, procs, workdir, "dns1")
            wait_until("DNS captured once the proxy listens", lambda: vm.dig(MESH_NAME) == MESH_IP)
            # IPv4 and IPv6 are two transactions: wait for the second (its raw DNS hook).
            wait_until("IPv6 too", lambda: vm.save().count("-A OUTPUT -j VMAGENT_DNS") == 2)
            after = vm.save()
            first_watchdog = _watchdog_pid(workdir)
            assert "VMAGENT_DNS" in after and "--to-ports 15053" in after

            # DNS to the resolv.conf nameserver (port 53) is answered by vmagent, UDP and TCP.
            assert vm.dig(MESH_NAME) == MESH_IP
            assert vm.dig("+tcp", MESH_NAME) == MESH_IP
            # Names vmagent forwards reach dnsmasq: vmagent's own query (uid 1337) to
            # 127.0.0.53:53 is not captured again (a loop would time out).
            assert vm.dig(UPSTREAM_NAME) == UPSTREAM_IP
            assert vm.dig("+tcp", UPSTREAM_NAME) == UPSTREAM_IP
            # DNS to a server not in resolv.conf is not captured.
            assert MESH_IP not in vm.dig(f"@{VM_ADDR}", MESH_NAME)

            # Idempotent: applying again (the agent after `capture apply`) changes nothing.
            again = vm.run(*vmagent("capture", "apply"), env=env)
            assert again.returncode == 0, again.stderr
            assert vm.save() == after
            watchdog = _watchdog_pid(workdir)
            assert not _alive(first_watchdog)  # replaced, never two

            # resolv.conf names another nameserver: the watchdog re-applies for it, and back.
            resolv = Path("/etc/netns") / vm.name / "resolv.conf"
            resolv.write_text("nameserver 127.0.0.54\n")  # same inode: the bind mount sees it
            wait_until("rules follow resolv.conf", lambda: "-d 127.0.0.54/32" in vm.save())
            assert "-d 127.0.0.53/32" not in vm.save()
            resolv.write_text(f"nameserver {NAMESERVER}\n")
            wait_until("rules follow resolv.conf back", lambda: vm.save() == after)

            # Outbound TCP to the service CIDR reaches Envoy's 15001 with its original
            # destination; inbound to ISTIO_INBOUND_PORTS from another host reaches 15006.
            assert _connect(vm, SERVICE_IP, 80) == f"15001 {SERVICE_IP}:80"
            # ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE: port 81 goes straight to the service.
            assert _connect(vm, SERVICE_IP, 81) == "81 direct"
            assert _connect(client, VM_ADDR, INBOUND_PORT) == f"15006 {VM_ADDR}:{INBOUND_PORT}"
            # The exempt uid's own outbound (Envoy's upstream call) is not captured.
            assert _connect(vm, SERVICE_IP, 80, as_exempt=True) == "80 direct"

            # kill -9 the DNS proxy: the watchdog switches DNS capture off; the host's
            # resolver answers from dnsmasq directly.
            os.kill(proxy_pid, signal.SIGKILL)  # ip netns exec and setpriv exec
            took = wait_until(
                "DNS answers again after kill -9",
                lambda: vm.dig(UPSTREAM_NAME) == UPSTREAM_IP and vm.dig(MESH_NAME) == "",
            )
            assert took < 10, took
            wait_until("IPv6 too", lambda: "VMAGENT_DNS" not in vm.save())
            assert vm.dig("+tcp", UPSTREAM_NAME) == UPSTREAM_IP
            # Only DNS fails open: outbound TCP still goes to Envoy.
            assert _connect(vm, SERVICE_IP, 80) == f"15001 {SERVICE_IP}:80"
            print(f"fail-open after kill -9: {took:.1f} s")

            # The proxy back: DNS capture back on (the watchdog saw its socket).
            _dns_proxy(vm, procs, workdir, "dns2")
            wait_until("DNS captured again", lambda: vm.dig(MESH_NAME) == MESH_IP)
            wait_until("both families as before", lambda: vm.save() == after)

            cleaned = vm.run(*vmagent("capture", "clean"), env=env)
            assert cleaned.returncode == 0, cleaned.stderr
            assert vm.save() == before
            assert not (workdir / "run" / "capture-watch.pid").exists()
            assert not _alive(watchdog)  # no watchdog left behind
            assert _connect(vm, SERVICE_IP, 80) == "80 direct"
            assert vm.dig(MESH_NAME) == ""
            assert vm.dig(UPSTREAM_NAME) == UPSTREAM_IP
    finally:
        pid_file = workdir / "run" / "capture-watch.pid"
        if pid_file.exists():  # a failed run: stop the watchdog it left
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        procs.close()


def test_capture_without_net_admin_says_what_to_do(workdir: Path) -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    env = vmagent_env(workdir, ISTIO_SERVICE_CIDR="*")
    done = subprocess.run(
        as_proxy([os.path.realpath(sys.executable), "-m", "vmagent", "capture", "show"]),
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("vmagent capture: "), done.stderr
    assert "run as root or with CAP_NET_ADMIN" in done.stderr
