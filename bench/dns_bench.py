#!/usr/bin/env python3
"""DNS benchmark: ``vmagent dns serve`` against dnsmasq, measured in the same run.

    .venv/bin/python bench/dns_bench.py [--seconds N]

Builds one table of mesh names and serves it twice on loopback: with dnsmasq (a hosts file via
``--addn-hosts``) and with ``vmagent dns serve`` (the same names as an Istio NameTable). A third
process, an authoritative dnsmasq, is the upstream of both for the "cached upstream" names; both
front servers forward to it and cache its answers. After warming both caches, ``dnsperf`` runs
against each server for each scenario:

- ``table``: A queries for the mesh names (answered from the hosts file / name table),
- ``cached``: A queries for upstream names (answered from each server's cache),
- ``mix``: 50% table A, 10% table AAAA (NODATA), 30% cached upstream A, 10% cached NXDOMAIN.

It prints queries per second, mean and p99 latency (p99 from dnsperf's per-query ``-v``
output), the response codes, and the vmagent/dnsmasq qps ratio per scenario. Run on demand;
not part of the test suite. Loopback only, every run bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
NAMESPACE = "bench"
MESH = "svc{i}.bench.svc.cluster.local"
UPSTREAM = "up{i}.bench.test"
NXDOMAIN = "nx{i}.bench.test"
UPSTREAM_TTL = 3600


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port: int = tcp.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def tool(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if found is None:
        sys.exit(f"dns_bench: {name} not found (scripts/setup --test installs it)")
    return found


def dnsmasq_cmd(workdir: Path, port: int, args: Sequence[str]) -> list[str]:
    return [
        tool("dnsmasq"),
        "--conf-file=/dev/null",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        f"--user={pwd.getpwuid(os.getuid()).pw_name}",
        f"--pid-file={workdir / f'dnsmasq-{port}.pid'}",
        f"--port={port}",
        f"--listen-address={LOOPBACK}",
        "--bind-interfaces",
        *args,
    ]


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start(name: str, cmd: list[str], port: int, workdir: Path, env: dict[str, str]) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
    server = Server(name, port, proc, log)
    deadline = time.monotonic() + 20
    probe = bytes.fromhex("abcd01000001000000000000") + b"\x05ready\x05bench\x04test\x00"
    probe += b"\x00\x01\x00\x01"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"dns_bench: {name} exited:\n{log.read_text(errors='replace')}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            try:
                sock.sendto(probe, (LOOPBACK, port))
                if sock.recv(4096)[:2] == probe[:2]:
                    return server
            except OSError:
                pass
        time.sleep(0.1)
    server.stop()
    sys.exit(f"dns_bench: {name} did not answer within 20 s:\n{log.read_text(errors='replace')}")


# --- inputs ------------------------------------------------------------------------------


def write_inputs(workdir: Path, names: int) -> dict[str, Path]:
    ip = [f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}" for i in range(names)]
    mesh = [MESH.format(i=i) for i in range(names)]
    files = {
        "mesh_hosts": workdir / "mesh.hosts",
        "upstream_hosts": workdir / "upstream.hosts",
        "name_table": workdir / "name-table.json",
        "resolv_conf": workdir / "resolv.conf",
    }
    files["mesh_hosts"].write_text("".join(f"{ip[i]} {mesh[i]}\n" for i in range(names)))
    files["upstream_hosts"].write_text(
        "".join(f"{ip[i]} {UPSTREAM.format(i=i)}\n" for i in range(names))
    )
    table = {
        "table": {
            mesh[i]: {
                "ips": [ip[i]],
                "registry": "Kubernetes",
                "shortname": f"svc{i}",
                "namespace": NAMESPACE,
            }
            for i in range(names)
        }
    }
    files["name_table"].write_text(json.dumps(table))
    files["resolv_conf"].write_text(f"nameserver {LOOPBACK}\n")  # unused: --upstream is given
    queries = {
        "table": [f"{MESH.format(i=i)} A" for i in range(names)],
        "cached": [f"{UPSTREAM.format(i=i)} A" for i in range(names)],
    }
    mix = []
    for i in range(names):
        mix += [f"{MESH.format(i=i)} A"] * 5
        mix.append(f"{MESH.format(i=i)} AAAA")
        mix += [f"{UPSTREAM.format(i=(i * 7 + k) % names)} A" for k in range(3)]
        mix.append(f"{NXDOMAIN.format(i=i % 100)} A")
    queries["mix"] = mix
    queries["warm"] = queries["cached"] + [f"{NXDOMAIN.format(i=i)} A" for i in range(100)]
    for key, lines in queries.items():
        path = workdir / f"queries-{key}.txt"
        path.write_text("\n".join(lines) + "\n")
        files[f"queries_{key}"] = path
    return files


# --- dnsperf -----------------------------------------------------------------------------


@dataclass
class Result:
    qps: float
    mean_ms: float
    p99_ms: float
    sent: int
    lost: int
    rcodes: str


def dnsperf(
    port: int, queries: Path, seconds: float, args: argparse.Namespace, out: Path
) -> Result:
    cmd = [
        tool("dnsperf"),
        "-s",
        LOOPBACK,
        "-p",
        str(port),
        "-d",
        str(queries),
        "-l",
        str(seconds),
        "-c",
        str(args.clients),
        "-q",
        str(args.outstanding),
        "-T",
        str(args.threads),
        "-t",
        "2",
        "-v",
    ]
    if args.max_qps:
        cmd += ["-Q", str(args.max_qps)]
    with out.open("wb") as sink:
        subprocess.run(
            cmd, stdout=sink, stderr=subprocess.STDOUT, timeout=seconds + 60, check=False
        )
    text_tail = ""
    latencies: list[float] = []
    with out.open("rb") as lines:
        for raw in lines:
            if raw.startswith(b"> "):
                with contextlib.suppress(ValueError, IndexError):
                    latencies.append(float(raw.rsplit(None, 1)[1]))
            else:
                text_tail += raw.decode(errors="replace")
    summary = dict(re.findall(r"^[ \t]+([A-Z][A-Za-z ()]+?):[ \t]+(.*)$", text_tail, re.M))
    qps = float(summary.get("Queries per second", "0") or 0)
    mean = summary.get("Average Latency (s)", "0").split()[0]
    sent = int(summary.get("Queries sent", "0").split()[0])
    lost = int(summary.get("Queries lost", "0").split()[0])
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    rcodes = summary.get("Response codes", "?")
    return Result(qps, float(mean) * 1000, p99 * 1000, sent, lost, rcodes)


def warm(port: int, queries: Path, args: argparse.Namespace, out: Path) -> None:
    """Ask every query file entry twice, gently, so both caches hold every answer."""
    cmd = [tool("dnsperf"), "-s", LOOPBACK, "-p", str(port), "-d", str(queries), "-n", "2"]
    cmd += ["-q", "20", "-t", "3", "-l", "30"]
    with out.open("wb") as sink:
        subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, timeout=60, check=False)


# --- main --------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(args: argparse.Namespace, workdir: Path) -> Iterator[dict[str, Server]]:
    files = write_inputs(workdir, args.names)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMAGENT_", "DNS_"))}
    env["VMAGENT_CLUSTER_ENV"] = "/dev/null"
    started: list[Server] = []
    try:
        up_port = free_port()
        upstream_args = [
            f"--addn-hosts={files['upstream_hosts']}",
            f"--local-ttl={UPSTREAM_TTL}",
            f"--auth-ttl={UPSTREAM_TTL}",
            "--auth-zone=bench.test",
            f"--auth-server=ns.bench.test,{LOOPBACK}",
            "--cache-size=10000",
        ]
        upstream = start(
            "upstream", dnsmasq_cmd(workdir, up_port, upstream_args), up_port, workdir, env
        )
        started.append(upstream)

        dm_port = free_port()
        front_args = [
            f"--addn-hosts={files['mesh_hosts']}",
            f"--server={LOOPBACK}#{up_port}",
            # mesh names are local: AAAA of a v4-only name is NODATA, as vmagent answers it
            "--local=/cluster.local/",
            "--local-ttl=30",
            f"--cache-size={max(10000, 4 * args.names)}",
            "--dns-forward-max=1000",
        ]
        started.append(
            start("dnsmasq", dnsmasq_cmd(workdir, dm_port, front_args), dm_port, workdir, env)
        )

        vm_port = free_port()
        vm_cmd = [sys.executable, "-m", "vmagent", "dns", "serve"]
        vm_cmd += ["--name-table", str(files["name_table"]), "--listen", f"{LOOPBACK}:{vm_port}"]
        vm_cmd += ["--upstream", f"{LOOPBACK}:{up_port}"]
        vm_cmd += ["--resolv-conf", str(files["resolv_conf"])]
        vm_cmd += ["--namespace", NAMESPACE, "--search", f"{NAMESPACE}.svc.cluster.local"]
        started.append(start("vmagent", vm_cmd, vm_port, workdir, env))
        yield {s.name: s for s in started}
    finally:
        for server in reversed(started):
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="dnsperf -l per run (10)")
    parser.add_argument("--names", type=int, default=1000, help="mesh and upstream names (1000)")
    parser.add_argument("--clients", type=int, default=8, help="dnsperf -c (8)")
    parser.add_argument("--outstanding", type=int, default=500, help="dnsperf -q (500)")
    parser.add_argument("--threads", type=int, default=1, help="dnsperf -T (1)")
    parser.add_argument(
        "--max-qps",
        type=int,
        default=0,
        help="dnsperf -Q: offer a fixed load to compare latency below saturation (default: off)",
    )
    parser.add_argument(
        "--scenarios", default="table,cached,mix", help="comma-separated subset to run"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]

    workdir = Path(tempfile.mkdtemp(prefix="dns-bench-"))
    print(
        f"dns_bench: {args.names} names, dnsperf -l {args.seconds:g} -c {args.clients} "
        f"-q {args.outstanding} -T {args.threads}"
        + (f" -Q {args.max_qps}" if args.max_qps else "")
        + f", {os.cpu_count()} CPUs, work dir {workdir}"
    )
    rows: list[tuple[str, str, Result]] = []
    try:
        with servers(args, workdir) as running:
            files = {p.stem.removeprefix("queries-"): p for p in workdir.glob("queries-*.txt")}
            for name in ("dnsmasq", "vmagent"):
                warm(running[name].port, files["warm"], args, workdir / f"warm-{name}.out")
                warm(running[name].port, files["table"], args, workdir / f"warm-{name}-t.out")
            for scenario in scenarios:
                for name in ("dnsmasq", "vmagent"):
                    out = workdir / f"dnsperf-{scenario}-{name}.out"
                    result = dnsperf(running[name].port, files[scenario], args.seconds, args, out)
                    rows.append((scenario, name, result))
                    print(
                        f"  {scenario:<7} {name:<8} {result.qps:>10.0f} qps  "
                        f"mean {result.mean_ms:6.3f} ms  p99 {result.p99_ms:6.3f} ms  "
                        f"lost {result.lost}/{result.sent}  [{result.rcodes}]",
                        flush=True,
                    )
            for name in ("dnsmasq", "vmagent"):
                if running[name].proc.poll() is not None:
                    print(f"  WARNING: {name} exited during the run")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"{'scenario':<9}{'server':<9}{'qps':>10}{'mean ms':>10}{'p99 ms':>10}{'lost':>9}")
    for scenario, name, r in rows:
        print(f"{scenario:<9}{name:<9}{r.qps:>10.0f}{r.mean_ms:>10.3f}{r.p99_ms:>10.3f}{r.lost:>9}")
    print()
    for scenario in scenarios:
        by = {name: r for s, name, r in rows if s == scenario}
        if "dnsmasq" in by and "vmagent" in by and by["dnsmasq"].qps > 0:
            ratio = by["vmagent"].qps / by["dnsmasq"].qps
            print(f"ratio vmagent/dnsmasq {scenario:<7} qps {ratio:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
