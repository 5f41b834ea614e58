"""What glibc makes of a wildcard behind the search domain (istio/istio#61732, open in Istio).

A network namespace of the test's own gets a resolv.conf like a pod's (``search ns1.svc...``,
``options ndots:5``) whose nameserver is ``vmagent dns serve`` on 127.0.0.1:53 inside the
namespace, with a dnsmasq upstream beside it. ``getent ahosts foo.wild.example.com`` tries the
search candidates first (3 dots < ndots 5), so its first query is
``foo.wild.example.com.ns1.svc.cluster.local.``: vmagent must answer
``CNAME foo.wild.example.com.`` + ``foo.wild.example.com. A 1.2.3.4``, and glibc then reports
``foo.wild.example.com`` as the canonical name (Istio answers ``CNAME *.wild.example.com.``).

Needs root (``ip netns add``); skipped with the reason otherwise. The namespace and
``/etc/netns/<name>`` are removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnsfixtures import (
    LOOPBACK,
    NAMESPACE,
    SEARCH,
    Dnsmasq,
    DnsServer,
    run_server,
    serve_argv,
    upstream_args,
    write_table,
)

pytestmark = pytest.mark.timeout(90)

UPSTREAM_PORT = 5353


class Netns:
    """A network namespace with loopback up and its own /etc/resolv.conf."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.etc = Path("/etc/netns") / name

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix(), *argv], capture_output=True, text=True, timeout=timeout, check=False
        )


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "getent", "dig", "dnsmasq"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed"
    return None


@pytest.fixture
def netns() -> Iterator[Netns]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    ns = Netns(f"vmdns-{uuid.uuid4().hex[:8]}")
    made = subprocess.run(["ip", "netns", "add", ns.name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
        ns.etc.mkdir(parents=True)
        (ns.etc / "resolv.conf").write_text(
            f"nameserver {LOOPBACK}\nsearch {' '.join(SEARCH)}\noptions ndots:5\n"
        )
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        shutil.rmtree(ns.etc, ignore_errors=True)


def _wait_for(
    ns: Netns, args: list[str], want: str, what: str, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        if want in ns.run("dig", "+time=1", "+tries=1", "+short", *args).stdout:
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not answer within 20 s")


def test_getent_reports_the_name_not_the_wildcard(netns: Netns, tmp_path: Path) -> None:
    dnsmasq_exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    log = tmp_path / "upstream.log"
    upstream_cmd = [
        *netns.prefix(),
        dnsmasq_exe,
        "--conf-file=/dev/null",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--user=root",
        f"--pid-file={tmp_path / 'dnsmasq.pid'}",
        f"--port={UPSTREAM_PORT}",
        f"--listen-address={LOOPBACK}",
        "--bind-interfaces",
        "--log-queries",
        f"--log-facility={log}",
        *upstream_args(tmp_path / "upstream"),
    ]
    running: list[Dnsmasq | DnsServer] = []
    try:
        upstream = subprocess.Popen(upstream_cmd, stdin=subprocess.DEVNULL)
        upstream_dns = Dnsmasq(upstream, LOOPBACK, UPSTREAM_PORT, tmp_path, log)
        running.append(upstream_dns)
        _wait_for(
            netns,
            [f"@{LOOPBACK}", "-p", str(UPSTREAM_PORT), "www.up.test"],
            "10.0.0.1",
            "dnsmasq",
            upstream,
        )
        argv = serve_argv(
            write_table(tmp_path / "name-table.json"),
            listen=[(LOOPBACK, 53)],
            upstreams=[f"{LOOPBACK}:{UPSTREAM_PORT}"],
            resolv_conf=netns.etc / "resolv.conf",
            search=SEARCH,
            namespace=NAMESPACE,
        )
        assert argv[0] == sys.executable
        server = run_server([*netns.prefix(), *argv], tmp_path / "vmagent")
        running.append(DnsServer(server, [(LOOPBACK, 53)], tmp_path / "vmagent" / "vmagent.log"))
        _wait_for(
            netns,
            [f"@{LOOPBACK}", "productpage.ns1.svc.cluster.local"],
            "9.9.9.9",
            "vmagent dns serve",
            server,
        )

        ahosts = netns.run("getent", "ahosts", "foo.wild.example.com")
        assert ahosts.returncode == 0, ahosts
        lines = [line.split() for line in ahosts.stdout.splitlines()]
        # glibc prints the canonical name on the first line.
        assert lines[0] == ["1.2.3.4", "STREAM", "foo.wild.example.com"], ahosts.stdout
        assert {line[0] for line in lines} == {"1.2.3.4"}
        assert "*" not in ahosts.stdout and "svc.cluster.local" not in ahosts.stdout

        # The first search candidate (A and AAAA) was answered from the table: the wildcard
        # name never went upstream under any spelling.
        time.sleep(0.2)  # dnsmasq writes its query log asynchronously
        queried = upstream_dns.queries()
        assert not [q for q in queried if "wild.example.com" in q[1]], queried

        # gethostbyname2(AF_INET6) first: the search list runs out on NODATA, then AF_INET.
        hosts = netns.run("getent", "hosts", "foo.wild.example.com")
        # address, canonical name, then aliases (the search name that was CNAMEd)
        assert hosts.stdout.split()[:2] == ["1.2.3.4", "foo.wild.example.com"], hosts.stdout
        assert "*" not in hosts.stdout
    finally:
        for process in reversed(running):
            process.stop()
