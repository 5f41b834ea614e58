#!/usr/bin/env python3
"""Scale benchmark: swapping a 100k-service NameTable into ``vmagent dns serve`` under load.

    .venv/bin/python bench/dns_table_bench.py [--services N] [--rate QPS] [--agent]

Generates an Istio NameTable of ``--services`` Kubernetes services (default 100,000; with the
search domain each answers to six names, 600k in all), starts ``vmagent dns serve`` on loopback
with a dnsmasq upstream (helpers from ``dns_bench.py``), and queries it at a steady rate from
one UDP socket, recording every query's wait. While it queries, the table file is rewritten
(atomically, then SIGHUP, as an operator would) with the same names on new addresses. It prints:

- the maximum and p99 query wait during the swap (rewrite until the first answer from the new
  table) and in the seconds after it (garbage-collection passes over the new objects),
- the swap duration (rewrite until answers come from the new table),
- the server's RSS with the first table loaded and after the swap (VmRSS, and VmHWM: the peak),

each next to its target from issue 7 §5. ``--agent`` measures instead the idle RSS of the full
agent (``vmagent run``) against devmesh with a ``--agent-services`` (10,000) service table, both
started as the e2e tests start them (``tests/e2e/e2e_helpers.py``).

Run on demand, not part of the test suite. Loopback only; every loop is bounded in count and
time (``--post`` seconds after the swap, ``--timeout`` for the swap itself).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dns_bench  # noqa: E402  (bench/ is not a package)

LOOPBACK = dns_bench.LOOPBACK
NAMESPACES = 100
PROXY_NAMESPACE = "ns0"
SEARCH = f"{PROXY_NAMESPACE}.svc.cluster.local"
LOST_AFTER = 2.0  # seconds without an answer: the query counts as lost (waited >= this)

# Issue 7 §5 targets.
TARGET_MAX_WAIT_MS = 50.0
TARGET_SWAP_S = 2.0
TARGET_RSS_MB = 150.0
TARGET_AGENT_RSS_MB = 60.0


def host(i: int) -> str:
    return f"svc{i}.ns{i % NAMESPACES}.svc.cluster.local"


def address(i: int, version: int) -> str:
    """Version 0 lives in 10/8, version 1 in 11/8: an answer's first octet says which table."""
    return f"{10 + version}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def table_json(services: int, version: int) -> str:
    table = {
        host(i): {
            "ips": [address(i, version)],
            "registry": "Kubernetes",
            "shortname": f"svc{i}",
            "namespace": f"ns{i % NAMESPACES}",
        }
        for i in range(services)
    }
    return json.dumps({"table": table})


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MB (10^6 bytes), from /proc."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024 / 1e6
    return found["VmRSS"], found["VmHWM"]


def rss_parts_mb(pid: int) -> tuple[float, float]:
    """(RssAnon, RssFile) of ``pid`` in MB: the process's own memory, and the pages of the
    files it maps (shared libraries: grpc, cryptography, libpython, ...)."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                found[key] = int(value.split()[0]) * 1024 / 1e6
    return found["RssAnon"], found["RssFile"]


# --- the steady-rate client ----------------------------------------------------------------


def query_wire(qid: int, name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


def answer_version(reply: bytes) -> int | None:
    """Which table answered: the first octet of the last A record (10 → 0, 11 → 1)."""
    if len(reply) < 16 or struct.unpack_from("!H", reply, 6)[0] == 0:
        return None
    return reply[-4] - 10


@dataclass
class Sample:
    sent: float
    wait: float  # seconds; LOST_AFTER or more when lost
    version: int | None


@dataclass
class Client:
    """Sends one A query every 1/rate seconds and records each one's wait."""

    port: int
    services: int
    rate: float
    host: str = LOOPBACK
    samples: list[Sample] = field(default_factory=list)
    _pending: dict[int, tuple[float, int]] = field(default_factory=dict)
    _next_id: int = 1
    _n: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect((self.host, self.port))
        self._next_send = time.monotonic()

    def run_until(self, deadline: float, stop_when_version: int | None = None) -> float | None:
        """Query until ``deadline``; with ``stop_when_version``, return early at the receive
        time of the first answer from that table version (else None)."""
        interval = 1.0 / self.rate
        sock = self.sock
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= self._next_send:
                self._send(now)
                self._next_send += interval
                if now - self._next_send > 0.1:  # we were descheduled: do not burst
                    self._next_send = now + interval
            self._expire(now)
            timeout = max(0.0, min(self._next_send, deadline) - time.monotonic())
            readable, _, _ = select.select([sock], [], [], timeout)
            if not readable:
                continue
            while True:
                try:
                    reply = sock.recv(4096)
                except BlockingIOError:
                    break
                got = time.monotonic()
                pending = self._pending.pop(struct.unpack_from("!H", reply)[0], None)
                if pending is None:
                    continue  # an answer after we gave up on it
                version = answer_version(reply)
                self.samples.append(Sample(pending[0], got - pending[0], version))
                if stop_when_version is not None and version == stop_when_version:
                    return got

    def _send(self, now: float) -> None:
        qid = self._next_id
        self._next_id = qid % 65535 + 1
        i = (self._n * 7919) % self.services  # spread over the table: mostly fast-path misses
        self._n += 1
        self._pending[qid] = (now, i)
        try:
            self.sock.send(query_wire(qid, host(i)))
        except OSError:
            pass

    def _expire(self, now: float) -> None:
        for qid, (sent, _) in list(self._pending.items()):
            if now - sent >= LOST_AFTER:
                del self._pending[qid]
                self.samples.append(Sample(sent, now - sent, None))

    def drain(self) -> None:
        """Wait for the answers still outstanding (bounded by LOST_AFTER)."""
        deadline = time.monotonic() + LOST_AFTER + 0.1
        while self._pending and time.monotonic() < deadline:
            self.run_until(min(deadline, time.monotonic() + 0.05))
            self._next_send = float("inf")
        self._expire(float("inf"))
        self.sock.close()


def waits_ms(samples: Sequence[Sample], start: float, end: float) -> tuple[float, float, int]:
    """(max, p99, count) of the waits of queries sent in [start, end), in ms."""
    waits = sorted(s.wait for s in samples if start <= s.sent < end)
    if not waits:
        return 0.0, 0.0, 0
    p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
    return waits[-1] * 1000, p99 * 1000, len(waits)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# --- dns serve -----------------------------------------------------------------------------


def serve_mode(args: argparse.Namespace, workdir: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMAGENT_", "DNS_"))}
    env["VMAGENT_CLUSTER_ENV"] = "/dev/null"
    t0 = time.monotonic()
    first, second = table_json(args.services, 0), table_json(args.services, 1)
    print(
        f"  tables: {args.services} services, {len(first) / 1e6:.1f} MB of JSON each "
        f"(generated in {time.monotonic() - t0:.1f} s)",
        flush=True,
    )
    table_path = workdir / "name-table.json"
    write_atomically(table_path, first)
    resolv = workdir / "resolv.conf"
    resolv.write_text(f"nameserver {LOOPBACK}\n")  # unused: --upstream is given
    started: list[dns_bench.Server] = []
    try:
        up_port = dns_bench.free_port()
        up_args = ["--auth-zone=bench.test", f"--auth-server=ns.bench.test,{LOOPBACK}"]
        started.append(
            dns_bench.start(
                "upstream", dns_bench.dnsmasq_cmd(workdir, up_port, up_args), up_port, workdir, env
            )
        )
        port = dns_bench.free_port()
        cmd = [sys.executable, "-m", "vmagent", "dns", "serve", "--name-table", str(table_path)]
        cmd += ["--listen", f"{LOOPBACK}:{port}", "--upstream", f"{LOOPBACK}:{up_port}"]
        cmd += ["--resolv-conf", str(resolv), "--namespace", PROXY_NAMESPACE, "--search", SEARCH]
        t_start = time.monotonic()
        server = dns_bench.start("vmagent", cmd, port, workdir, env)
        started.append(server)
        client = Client(port, args.services, args.rate)
        loaded = client.run_until(t_start + args.timeout, stop_when_version=0)
        if loaded is None:
            print("  the first table never answered; see", server.log)
            return 1
        print(f"  first table answering {loaded - t_start:.1f} s after start", flush=True)
        client.run_until(time.monotonic() + args.settle)
        rss_before, hwm_before = rss_mb(server.proc.pid)

        swap_at = time.monotonic()
        write_atomically(table_path, second)
        server.proc.send_signal(signal.SIGHUP)
        swapped = client.run_until(swap_at + args.timeout, stop_when_version=1)
        end = (swapped or swap_at + args.timeout) + args.post
        client.run_until(end)
        client.drain()
        rss_after, hwm_after = rss_mb(server.proc.pid)
        alive = server.proc.poll() is None
    finally:
        for running in reversed(started):
            running.stop()

    samples = client.samples
    base = waits_ms(samples, swap_at - args.settle, swap_at)
    during = waits_ms(samples, swap_at, swapped or end)
    after = waits_ms(samples, swapped or end, end)
    overall = waits_ms(samples, swap_at, end)
    stale = sum(1 for s in samples if swapped and s.sent > swapped + 0.01 and s.version == 0)
    print()
    print(f"{'window':<28}{'queries':>8}{'max ms':>10}{'p99 ms':>10}")
    for label, (mx, p99, n) in (
        (f"before swap ({args.settle:g} s)", base),
        ("during swap", during),
        (f"after swap ({args.post:g} s)", after),
    ):
        print(f"{label:<28}{n:>8}{mx:>10.1f}{p99:>10.1f}")
    print()
    swap_s = (swapped - swap_at) if swapped else float("inf")
    rows = [
        ("max query wait, swap+after", f"{overall[0]:.1f} ms", f"<= {TARGET_MAX_WAIT_MS:g} ms",
         overall[0] <= TARGET_MAX_WAIT_MS),
        ("p99 query wait, swap+after", f"{overall[1]:.1f} ms", "", True),
        ("swap duration", f"{swap_s:.2f} s", f"<= {TARGET_SWAP_S:g} s", swap_s <= TARGET_SWAP_S),
        ("RSS, first table loaded", f"{rss_before:.0f} MB", f"<= {TARGET_RSS_MB:g} MB",
         rss_before <= TARGET_RSS_MB),
        ("RSS, after the swap", f"{rss_after:.0f} MB", f"<= {TARGET_RSS_MB:g} MB",
         rss_after <= TARGET_RSS_MB),
        ("peak RSS (VmHWM)", f"{max(hwm_before, hwm_after):.0f} MB", "", True),
    ]  # fmt: skip
    for label, value, target, ok in rows:
        print(f"{label:<28}{value:>10}  {target:<12}{verdict(ok) if target else ''}")
    cpu = builder_cpu(table_path)
    print(f"{'builder CPU (alone, again)':<28}{cpu:>8.2f} s  (the swap's own work: a loaded")
    print(f"{'':<28}{'':>10}  machine makes the swap duration longer than this)")
    if stale:
        print(f"WARNING: {stale} answers from the old table after the first new one")
    if not alive:
        print("WARNING: vmagent exited during the run")
    return 0


def builder_cpu(table_path: Path) -> float:
    """CPU seconds (user + sys) the child that builds a reloaded table's lookup takes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = [sys.executable, "-m", "vmagent.dns.tablebuild", str(table_path)]
    argv += [PROXY_NAMESPACE, "cluster.local", SEARCH]
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# --- the full agent ------------------------------------------------------------------------


def agent_mode(args: argparse.Namespace, workdir: Path) -> int:
    sys.path.insert(0, str(HERE.parent / "tests"))
    sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))
    import e2e_helpers as e2e

    services = [
        {
            "host": f"svc{i}.ns{i % 10}.svc.cluster.local",
            "namespace": f"ns{i % 10}",
            "addresses": [address(i, 0)],
            "ports": [{"name": "http", "port": 80, "protocol": "HTTP"}],
        }
        for i in range(args.agent_services)
    ]
    world = e2e.World(workdir)
    try:
        mesh = world.devmesh(services=services)
        agent = world.agent(mesh)
        proc = agent.start()
        agent.wait_ready(timeout=args.timeout + 60)

        # Waits through DNS, not /status (which renders the whole table on every call).
        last = args.agent_services - 1
        name, want = f"svc{last}.ns{last % 10}.svc.cluster.local", [address(last, 0)]
        e2e.wait_for(lambda: agent.resolve(name) == want, args.timeout + 60, "the table")
        time.sleep(args.settle)
        rss, hwm = rss_mb(proc.popen.pid)
        anon, mapped = rss_parts_mb(proc.popen.pid)
        entries = int(agent.status()["dns"]["counters"]["table_entries"])
    finally:
        world.close()
    print()
    print(f"agent idle with {entries} table entries:")
    print(f"{'RSS, vmagent run (idle)':<28}{rss:>7.0f} MB  <= {TARGET_AGENT_RSS_MB:g} MB  "
          f"{verdict(rss <= TARGET_AGENT_RSS_MB)}")  # fmt: skip
    print(f"{'  of it RssAnon / RssFile':<28}{anon:>7.0f} / {mapped:.0f} MB")
    print(f"{'peak RSS (VmHWM)':<28}{hwm:>7.0f} MB")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--services", type=int, default=100_000, help="table size (100000)")
    parser.add_argument("--rate", type=float, default=1000, help="queries per second (1000)")
    parser.add_argument("--settle", type=float, default=3, help="seconds before the swap (3)")
    parser.add_argument("--post", type=float, default=5, help="seconds measured after it (5)")
    parser.add_argument("--timeout", type=float, default=30, help="max seconds for a load (30)")
    parser.add_argument("--agent", action="store_true", help="measure the full agent's RSS")
    parser.add_argument("--agent-services", type=int, default=10_000, help="(10000)")
    parser.add_argument(
        "--nds", action="store_true", help="push --services to `vmagent run` over NDS"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--agent-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment for the agent (--nds), e.g. MALLOC_ARENA_MAX=2",
    )  # fmt: skip
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="dns-table-bench-"))
    mode = "agent" if args.agent else "nds" if args.nds else "dns serve"
    print(f"dns_table_bench ({mode}): {os.cpu_count()} CPUs, work dir {workdir}", flush=True)
    try:
        if args.nds:
            from dns_table_nds import nds_mode

            return nds_mode(args, workdir)
        return agent_mode(args, workdir) if args.agent else serve_mode(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
