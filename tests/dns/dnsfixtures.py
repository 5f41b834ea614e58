"""Real processes for the DNS proxy's black-box tests.

- :class:`Dnsmasq`: a real dnsmasq on loopback, authoritative for a few test zones (so negative
  answers carry an SOA), with an optional query log that tests count upstream queries from.
- :class:`DelayRelay`: a UDP and TCP relay in front of dnsmasq that delays each query and
  records the exact bytes vmagent sent upstream and over which transport (in-flight
  coalescing, EDNS towards upstream, TCP retry after a truncated UDP answer).
- :class:`Blackhole`: a bound UDP/TCP port that never answers (a dead upstream).
- :class:`DnsServer` / :class:`ServerFactory`: ``vmagent dns serve`` as a subprocess, started on
  a free loopback port, waited for (bounded) and always ended.

Everything binds to loopback addresses only, every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdatatype
from loopback import free_port as free_port  # re-exported for the suite
from loopback import port_free as port_free

LOOPBACK = "127.0.0.1"
UPSTREAM_TTL = 60  # auth-ttl of the standard upstream: positive TTL and SOA minimum
BIG_COUNT = 100  # A records of big.up.test: ~1.7 kB, more than 512 and 1232 bytes
MEDIUM_COUNT = 40  # A records of medium.up.test: ~700 bytes, more than 512
HUGE_COUNT = 300  # A records of huge.up.test: ~4.9 kB, more than any UDP buffer we use
HOSTS_COUNT = 400  # h0.up.test .. h399.up.test, one A record each, for cache tests
UPSTREAM_TABLE_NAME_IP = "7.7.7.7"  # what the upstream says for the table's productpage name

# Settings that must not leak from the developer's shell into the server under test.
_LEAKY_ENV = re.compile(r"^(VMAGENT_|DNS_|ISTIO_|POD_NAMESPACE$|PILOT_|REDIRECT_DNS$)")


# ---------------------------------------------------------------------------------------------
# Ports


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# dnsmasq


def _run_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


_LOG_QUERY = re.compile(r"(?:query|auth)\[([A-Za-z0-9]+)\] (\S+) from ")


@dataclass
class Dnsmasq:
    """A dnsmasq process in the foreground; :meth:`stop` or :meth:`kill` ends it."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    workdir: Path
    log_path: Path | None

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    @classmethod
    def start(
        cls,
        workdir: Path,
        args: Sequence[str],
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        log: bool = True,
        probe: str | None = None,
    ) -> Dnsmasq:
        exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        workdir.mkdir(parents=True, exist_ok=True)
        port = port if port is not None else free_port(host)
        log_path = workdir / "dnsmasq.log" if log else None
        cmd = [
            exe,
            "--conf-file=/dev/null",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--user={_run_user()}",
            f"--pid-file={workdir / 'dnsmasq.pid'}",
            f"--port={port}",
            f"--listen-address={host}",
            "--bind-interfaces",
            *args,
        ]
        if log_path is not None:
            cmd += ["--log-queries", f"--log-facility={log_path}"]
        stderr = (workdir / "dnsmasq.stderr").open("wb")
        proc = subprocess.Popen(cmd, stdout=stderr, stderr=stderr, stdin=subprocess.DEVNULL)
        stderr.close()
        server = cls(proc, host, port, workdir, log_path)
        server._wait_ready(probe)
        return server

    def _wait_ready(self, probe: str | None) -> None:
        deadline = time.monotonic() + 10
        name = probe or "dnsmasq-ready.invalid."
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.workdir / "dnsmasq.stderr").read_text(errors="replace")
                raise RuntimeError(f"dnsmasq exited with {self.proc.returncode}: {err}")
            with contextlib.suppress(Exception):
                dns.query.udp(dns.message.make_query(name, "A"), self.host, 0.3, self.port)
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("dnsmasq did not answer within 10 s")

    def stop(self) -> None:
        _terminate(self.proc)

    def kill(self) -> None:
        """SIGKILL and reap: the upstream is gone at once."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    # Query log ---------------------------------------------------------------------------

    def sync(self) -> None:
        """Wait until every query dnsmasq has received so far is in its log (bounded).

        dnsmasq serves UDP in one loop: once a sentinel sent now appears in the log, every
        UDP query that arrived before it is logged too. TCP queries are logged by forked
        children, so give those a moment as well.
        """
        assert self.log_path is not None, "dnsmasq started without a query log"
        sentinel = f"sync-{uuid.uuid4().hex[:12]}.up.test"
        deadline = time.monotonic() + 5
        with contextlib.suppress(Exception):
            dns.query.udp(dns.message.make_query(sentinel, "A"), self.host, 2, self.port)
        while time.monotonic() < deadline:
            if sentinel in self.log_path.read_text(errors="replace"):
                time.sleep(0.05)
                return
            time.sleep(0.01)
        raise AssertionError("dnsmasq query log did not catch up within 5 s")

    def queries(self, name: str | None = None, qtype: str | None = None) -> list[tuple[str, str]]:
        """(qtype, name) of the queries logged so far, optionally filtered (case-insensitive)."""
        assert self.log_path is not None, "dnsmasq started without a query log"
        found: list[tuple[str, str]] = []
        if not self.log_path.exists():
            return found
        want = name.lower().rstrip(".") if name else None
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = _LOG_QUERY.search(line)
            if not match:
                continue
            rtype, qname = match.group(1).upper(), match.group(2).lower().rstrip(".")
            if want is not None and qname != want:
                continue
            if qtype is not None and rtype != qtype.upper():
                continue
            found.append((rtype, qname))
        return found

    def count(self, name: str, qtype: str | None = None) -> int:
        """How many queries for ``name`` (and ``qtype``) reached this dnsmasq, after a sync."""
        self.sync()
        return len(self.queries(name, qtype))


def upstream_args(workdir: Path, *, ttl: int = UPSTREAM_TTL, listen: str = LOOPBACK) -> list[str]:
    """dnsmasq arguments of the standard upstream.

    Authoritative (``--auth-zone``) for ``up.test``, ``cluster.local`` and ``example.com`` so
    that NXDOMAIN and NODATA carry an SOA whose TTL and minimum are ``ttl`` (RFC 2308 negative
    caching); other names are REFUSED. ``--edns-packet-max=4096``: answers up to 4096 bytes come
    over UDP when asked with EDNS, ``huge.up.test`` (~4.9 kB) only over TCP.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    hosts = workdir / "upstream.hosts"
    lines = [f"10.1.{i // 250}.{i % 250 + 1} big.up.test" for i in range(BIG_COUNT)]
    lines += [f"10.3.{i // 250}.{i % 250 + 1} medium.up.test" for i in range(MEDIUM_COUNT)]
    lines += [f"10.4.{i // 250}.{i % 250 + 1} huge.up.test" for i in range(HUGE_COUNT)]
    lines += [f"10.2.{i // 250}.{i % 250 + 1} h{i}.up.test" for i in range(HOSTS_COUNT)]
    hosts.write_text("\n".join(lines) + "\n")
    return [
        f"--addn-hosts={hosts}",
        "--host-record=www.up.test,10.0.0.1",
        "--host-record=v6.up.test,fd00::1",
        "--txt-record=www.up.test,hello upstream",
        "--mx-host=www.up.test,mail.up.test,10",
        "--host-record=mail.up.test,10.0.0.25",
        # The table's own names: other qtypes are forwarded here; A is what a client would
        # get from upstream while the table is not loaded.
        f"--host-record=productpage.ns1.svc.cluster.local,{UPSTREAM_TABLE_NAME_IP}",
        "--txt-record=productpage.ns1.svc.cluster.local,mesh txt",
        "--mx-host=productpage.ns1.svc.cluster.local,mail.up.test,5",
        "--host-record=api.external.com.svc.cluster.local,10.0.0.77",
        f"--local-ttl={ttl}",
        f"--auth-ttl={ttl}",
        "--auth-zone=up.test",
        "--auth-zone=cluster.local",
        "--auth-zone=example.com",
        # reverse zone 9.9.9.in-addr.arpa (9.9.9.9 is a table address): PTR 9.9.9.9 -> ptr.rev.test
        "--auth-zone=rev.test,9.9.9.0/24",
        "--host-record=ptr.rev.test,9.9.9.9",
        f"--auth-server=ns.up.test,{listen}",
        "--auth-soa=1,hostmaster.up.test,1200,120,1209600",
        "--edns-packet-max=4096",
        "--cache-size=1000",
    ]


def start_upstream(
    workdir: Path,
    *,
    ttl: int = UPSTREAM_TTL,
    host: str = LOOPBACK,
    port: int | None = None,
    log: bool = True,
) -> Dnsmasq:
    """The standard upstream dnsmasq (see :func:`upstream_args`)."""
    return Dnsmasq.start(
        workdir,
        upstream_args(workdir, ttl=ttl, listen=host),
        host=host,
        port=port,
        log=log,
        probe="www.up.test.",
    )


# ---------------------------------------------------------------------------------------------
# Helpers in front of upstreams


class Blackhole:
    """A bound UDP socket and a listening TCP socket that never answer: a dead upstream."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = free_port(host)
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind((host, self.port))
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.bind((host, self.port))
        self._tcp.listen(64)

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    def close(self) -> None:
        self._udp.close()
        self._tcp.close()


class DelayRelay:
    """UDP and TCP relay to ``target`` that waits ``delay`` seconds before forwarding a query.

    ``received`` (UDP) and ``tcp_received`` keep the raw bytes of every query that reached the
    relay: what vmagent sent upstream, and over which transport. Bounded: at most ``limit``
    queries are relayed, each in a short-lived thread.
    """

    def __init__(
        self, target: tuple[str, int], delay: float, *, host: str = LOOPBACK, limit: int = 2000
    ) -> None:
        self.target = target
        self.delay = delay
        self.limit = limit
        self.received: list[bytes] = []
        self.tcp_received: list[bytes] = []
        self._lock = threading.Lock()
        self.host = host
        self.port = free_port(host)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, self.port))
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, self.port))
        self._listener.listen(64)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._udp_loop, daemon=True),
            threading.Thread(target=self._tcp_loop, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    def queries_for(self, name: str, *, tcp: bool = False) -> list[dns.message.Message]:
        want = dns.name.from_text(name)
        with self._lock:
            packets = list(self.tcp_received if tcp else self.received)
        found = []
        for wire in packets:
            with contextlib.suppress(Exception):
                msg = dns.message.from_wire(wire)
                if msg.question and msg.question[0].name == want:
                    found.append(msg)
        return found

    def _record(self, store: list[bytes], wire: bytes) -> bool:
        with self._lock:
            if len(self.received) + len(self.tcp_received) >= self.limit:
                return False
            store.append(wire)
            return True

    def _udp_loop(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                wire, peer = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if self._record(self.received, wire):
                threading.Thread(target=self._relay_udp, args=(wire, peer), daemon=True).start()

    def _relay_udp(self, wire: bytes, peer: Any) -> None:
        if self._stop.wait(self.delay):
            return
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            out.settimeout(3)
            try:
                out.sendto(wire, self.target)
                answer, _ = out.recvfrom(65535)
                self._sock.sendto(answer, peer)
            except OSError:
                return

    def _tcp_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._relay_tcp, args=(conn,), daemon=True).start()

    def _relay_tcp(self, conn: socket.socket) -> None:
        with conn:
            for _ in range(100):  # queries per connection, bounded
                wire = tcp_read_message(conn, timeout=3)
                if wire is None or not self._record(self.tcp_received, wire):
                    return
                if self._stop.wait(self.delay):
                    return
                try:
                    with socket.create_connection(self.target, timeout=3) as out:
                        out.sendall(frame(wire))
                        answer = tcp_read_message(out, timeout=3)
                    if answer is None:
                        return
                    conn.sendall(frame(answer))
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self._sock.close()
        self._listener.close()


# ---------------------------------------------------------------------------------------------
# The name table the tests serve

NAMESPACE = "ns1"
SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")
REVIEWS_V4 = ("10.0.0.2", "10.0.0.3", "10.0.0.4")
MULTI_V4 = ("1.0.0.1", "1.0.0.2", "1.0.0.3", "1.0.0.4")
MANY_V4 = tuple(f"10.77.0.{i + 1}" for i in range(80))  # ~1.3 kB answer from the table

TABLE: dict[str, Any] = {
    "table": {
        "productpage.ns1.svc.cluster.local": {
            "ips": ["9.9.9.9"],
            "registry": "Kubernetes",
            "shortname": "productpage",
            "namespace": "ns1",
            "alt_hosts": ["pp.alt.example"],
        },
        "reviews.ns2.svc.cluster.local": {
            "ips": [*REVIEWS_V4, "fd00::2"],
            "registry": "Kubernetes",
            "shortname": "reviews",
            "namespace": "ns2",
        },
        "v6only.ns1.svc.cluster.local": {
            "ips": ["fd00::9"],
            "registry": "Kubernetes",
            "shortname": "v6only",
            "namespace": "ns1",
        },
        "api.external.com": {"ips": ["1.1.1.1"], "registry": "External"},
        "multi.external.com": {"ips": list(MULTI_V4), "registry": "External"},
        "many.external.com": {"ips": list(MANY_V4), "registry": "External"},
        "*.wild.example.com": {"ips": ["1.2.3.4"], "registry": "External"},
        "*.b.wild.example.com": {"ips": ["5.6.7.8"], "registry": "External"},
    }
}


def write_table(path: Path, table: Mapping[str, Any] = TABLE) -> Path:
    """Write a NameTable file atomically (rename), so the server never reads half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)
    return path


def write_resolv_conf(
    path: Path, nameservers: Iterable[str] = (LOOPBACK,), search: Iterable[str] = SEARCH
) -> Path:
    lines = [f"nameserver {ns}" for ns in nameservers]
    search = list(search)
    if search:
        lines.insert(0, "search " + " ".join(search))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# vmagent dns serve


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _LEAKY_ENV.match(k)}
    env["VMAGENT_CLUSTER_ENV"] = "/dev/null"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class DnsServer:
    """A running ``vmagent dns serve``; ``host``/``port`` is its first listen address."""

    proc: subprocess.Popen[bytes]
    listen: list[tuple[str, int]]
    stderr_path: Path
    argv: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.listen[0][0]

    @property
    def port(self) -> int:
        return self.listen[0][1]

    def output(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int = signal.SIGHUP) -> None:
        self.proc.send_signal(sig)

    def wait_ready(self, probe: str, timeout: float = 20.0) -> None:
        """Wait (bounded) until every listen address answers ``probe`` over UDP."""
        deadline = time.monotonic() + timeout
        for host, port in self.listen:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"vmagent dns serve exited with {self.proc.returncode}:\n{self.output()}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"vmagent dns serve did not answer on {hostport(host, port)} within "
                        f"{timeout} s:\n{self.output()}"
                    )
                # Any reply with our ID counts: readiness is not about the answer's content.
                wire = dns.message.make_query(probe, "A").to_wire()
                reply = raw_udp(host, port, wire, timeout=0.5)
                if reply is not None and reply[:2] == wire[:2]:
                    break
                time.sleep(0.05)

    def stop(self) -> None:
        _terminate(self.proc)


def serve_argv(
    name_table: Path,
    *,
    listen: Sequence[tuple[str, int]] = (),
    upstreams: Sequence[str] = (),
    resolv_conf: Path | None = None,
    search: Sequence[str] | None = SEARCH,
    namespace: str | None = NAMESPACE,
    extra: Sequence[str] = (),
) -> list[str]:
    argv = [sys.executable, "-m", "vmagent", "dns", "serve", "--name-table", str(name_table)]
    for host, port in listen:
        argv += ["--listen", hostport(host, port)]
    for upstream in upstreams:
        argv += ["--upstream", upstream]
    if resolv_conf is not None:
        argv += ["--resolv-conf", str(resolv_conf)]
    for domain in search or ():
        argv += ["--search", domain]
    if namespace is not None:
        argv += ["--namespace", namespace]
    return argv + list(extra)


def run_server(
    argv: Sequence[str], workdir: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr going to ``workdir/vmagent.log``."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "vmagent.log").open("ab") as out:
        return subprocess.Popen(
            list(argv), stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=server_env(env)
        )


class ServerFactory:
    """Starts ``vmagent dns serve`` processes and always ends them in :meth:`close`."""

    def __init__(self, workdir: Path, upstream: Dnsmasq | None) -> None:
        self.workdir = workdir
        self.upstream = upstream
        self.servers: list[DnsServer] = []

    def start(
        self,
        *,
        table: Mapping[str, Any] | None = TABLE,
        name_table: Path | None = None,
        upstreams: Sequence[str] | None = None,
        listen: Sequence[tuple[str, int]] | None = None,
        resolv_conf: Path | None = None,
        search: Sequence[str] | None = SEARCH,
        namespace: str | None = NAMESPACE,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        probe: str | None = "productpage.ns1.svc.cluster.local.",
        ready_timeout: float = 20.0,
    ) -> DnsServer:
        """Start a server on a fresh loopback port and wait until it answers ``probe``.

        ``table`` is written to a fresh file unless ``name_table`` names one (which may not
        exist). ``upstreams`` defaults to the standard upstream. ``resolv_conf`` defaults to a
        file whose only nameserver is 127.0.0.1:53 (nothing listens there) so that the host's
        resolv.conf never matters. ``probe=None`` skips the readiness wait.
        """
        index = len(self.servers)
        workdir = self.workdir / f"vmagent-{index}"
        workdir.mkdir(parents=True, exist_ok=True)
        if name_table is None:
            name_table = workdir / "name-table.json"
            if table is not None:
                write_table(name_table, table)
        if upstreams is None:
            upstreams = [self.upstream.address] if self.upstream else []
        if listen is None:
            listen = [(LOOPBACK, free_port())]
        if resolv_conf is None:
            resolv_conf = write_resolv_conf(workdir / "resolv.conf", [LOOPBACK], [])
        argv = serve_argv(
            name_table,
            listen=listen,
            upstreams=upstreams,
            resolv_conf=resolv_conf,
            search=search,
            namespace=namespace,
            extra=extra,
        )
        proc = run_server(argv, workdir, env)
        server = DnsServer(proc, list(listen), workdir / "vmagent.log", argv)
        self.servers.append(server)
        if probe is not None:
            server.wait_ready(probe, ready_timeout)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(3)


# ---------------------------------------------------------------------------------------------
# Clients


def query(
    name: str,
    rdtype: str = "A",
    *,
    edns: int | bool = False,
    payload: int = 1232,
    rd: bool = True,
) -> dns.message.QueryMessage:
    flags = dns.flags.RD if rd else 0
    if edns is False:
        return dns.message.make_query(name, rdtype, use_edns=False, flags=flags)
    level = 0 if edns is True else edns
    return dns.message.make_query(name, rdtype, use_edns=level, payload=payload, flags=flags)


def udp(
    server: DnsServer | Dnsmasq,
    name: str,
    rdtype: str = "A",
    *,
    edns: int | bool = False,
    payload: int = 1232,
    timeout: float = 5.0,
) -> dns.message.Message:
    """One UDP exchange with dnspython; truncated answers are returned, not raised."""
    msg = query(name, rdtype, edns=edns, payload=payload)
    return dns.query.udp(msg, server.host, timeout, server.port)


def tcp(
    server: DnsServer | Dnsmasq,
    name: str,
    rdtype: str = "A",
    *,
    edns: int | bool = False,
    payload: int = 1232,
    timeout: float = 5.0,
) -> dns.message.Message:
    msg = query(name, rdtype, edns=edns, payload=payload)
    return dns.query.tcp(msg, server.host, timeout, server.port)


def raw_udp(host: str, port: int, wire: bytes, timeout: float = 3.0) -> bytes | None:
    """Send one datagram; the reply, or None when nothing came back within ``timeout``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(wire, (host, port))
        try:
            data, _ = sock.recvfrom(65535)
        except TimeoutError:
            return None
        return data


def recv_exact(sock: socket.socket, count: int, timeout: float) -> bytes:
    """Read exactly ``count`` bytes; fewer if the peer closes or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    chunks = b""
    while len(chunks) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            break
        try:
            chunk = sock.recv(count - len(chunks))
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        chunks += chunk
    return chunks


def tcp_read_message(sock: socket.socket, timeout: float = 5.0) -> bytes | None:
    """One length-prefixed DNS message from ``sock``; None on EOF or timeout."""
    head = recv_exact(sock, 2, timeout)
    if len(head) < 2:
        return None
    (length,) = struct.unpack("!H", head)
    body = recv_exact(sock, length, timeout)
    return body if len(body) == length else None


def frame(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def connection_closed(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closes (EOF or reset) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            return False
        try:
            data = sock.recv(65535)
        except (ConnectionResetError, BrokenPipeError):
            return True
        if not data:
            return True


def dig(server: DnsServer | Dnsmasq, *args: str, timeout: float = 15.0) -> str:
    exe = shutil.which("dig") or "/usr/bin/dig"
    cmd = [exe, f"@{server.host}", "-p", str(server.port), "+time=3", "+tries=1", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    return done.stdout + done.stderr


def dig_flags(out: str) -> set[str]:
    """The header flags dig printed (``;; flags: qr aa rd;``), empty when none."""
    match = re.search(r";; flags:([a-z ]*);", out)
    return set(match.group(1).split()) if match else set()


# ---------------------------------------------------------------------------------------------
# Reading answers


def addresses(msg: dns.message.Message, rdtype: str = "A") -> list[str]:
    """The A (or AAAA) addresses of the answer section, in order."""
    want = dns.rdatatype.from_text(rdtype)
    return [rd.to_text() for rrset in msg.answer if rrset.rdtype == want for rd in rrset]


def answer_records(msg: dns.message.Message) -> list[tuple[str, str, int, str, int]]:
    """(owner, type, class, rdata, ttl) of each answer record, in wire order."""
    out = []
    for rrset in msg.answer:
        for rd in rrset:
            out.append(
                (
                    rrset.name.to_text().lower(),
                    dns.rdatatype.to_text(rrset.rdtype),
                    int(rrset.rdclass),
                    rd.to_text(),
                    int(rrset.ttl),
                )
            )
    return out


def wire_answer_records(wire: bytes) -> list[tuple[int, int, int]]:
    """(type, class, ttl) of every answer RR read straight from the wire (wire order)."""
    (qd, an) = struct.unpack("!HH", wire[4:8])
    offset = 12
    for _ in range(qd):
        offset = _skip_name(wire, offset) + 4
    records = []
    for _ in range(an):
        offset = _skip_name(wire, offset)
        rtype, rclass, ttl, rdlen = struct.unpack("!HHIH", wire[offset : offset + 10])
        records.append((rtype, rclass, ttl))
        offset += 10 + rdlen
    return records


def _skip_name(wire: bytes, offset: int) -> int:
    for _ in range(256):
        length = wire[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            return offset + 2
        offset += 1 + length
    raise ValueError("name too long")


def question_bytes(wire: bytes) -> bytes:
    """The raw question section (first question) of a message."""
    end = _skip_name(wire, 12) + 4
    return wire[12:end]


def header_counts(wire: bytes) -> tuple[int, int, int, int]:
    qd, an, ns, ar = struct.unpack("!HHHH", wire[4:12])
    return qd, an, ns, ar


def rcode_of(wire: bytes) -> int:
    return wire[3] & 0x0F


def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate()`` until it is truthy or ``timeout`` seconds pass (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def edns_opt(msg: dns.message.Message) -> bool:
    """True when the message carries an OPT record."""
    return msg.edns >= 0
