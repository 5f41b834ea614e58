#!/usr/bin/env python3
"""Certificate rotation under load, through Envoy on the ``vmagent dev`` path.

    sudo .venv/bin/python bench/rotation_bench.py [--seconds 60] [--rate 200] [--ttl 10s]

Starts ``vmagent dev`` (devmesh + agent + Envoy + demo app) with ``SECRET_TTL=10s``: the dev CA
signs what the CSR asks for, so each workload certificate lives 10 s and the agent rotates it at
half its life (Istio's ``SECRET_GRACE_PERIOD_RATIO`` 0.5), about every 5 s, pushing each one to
Envoy over SDS. Then it sends ``--rate`` requests per second for ``--seconds`` along the
banner's command (parsed from the banner): HTTP to Envoy's outbound listener, Istio mTLS to
Envoy's inbound listener, the demo app's ``/whoami``. Open loop: request *i* is due at
``i / rate`` s, whatever the others do, over a pool of keep-alive connections (at most
``--connections``; a request waits for a free one).

A request fails when it errors, times out (``--timeout``, 5 s), answers other than 200, or the
app did not see the VM's SPIFFE ID. Prints failures (target 0), p50/p99/max latency (from
sending to the whole answer), requests sent late (over 50 ms behind schedule: the load
generator falling behind), rotations (the agent's "new certificate" log lines during the
load), Envoy's SDS updates of its TLS contexts, and new mTLS handshakes.

Runs in a network namespace of its own (root), where ``vmagent dev`` keeps its default ports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh_bench_lib import (
    ROOT,
    SPIFFE_ID,
    Procs,
    base_env,
    enter_own_netns,
    envoy_stats,
    http_ok,
    percentile,
    vmagent,
    wait_until,
)

STATUS = "http://127.0.0.1:15020"
ADMIN_PORT = 15000
LATE = 0.050


@dataclass
class Target:
    host: str  # the Host header
    address: str
    port: int
    path: str

    def request(self) -> bytes:
        return f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()


def banner_target(output: str) -> Target:
    """The banner's ``curl -s -H 'Host: X' http://ADDRESS:PORT/whoami`` as a :class:`Target`."""
    line = next(ln.strip() for ln in output.splitlines() if ln.strip().startswith("curl "))
    argv = shlex.split(line)
    host = argv[argv.index("-H") + 1].split(":", 1)[1].strip()
    url = argv[-1].removeprefix("http://")
    hostport, _, path = url.partition("/")
    address, _, port = hostport.rpartition(":")
    return Target(host, address.strip("[]"), int(port), "/" + path)


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    late: int = 0

    def fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1


async def one_request(
    target: Target, pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None],
    results: Results, timeout: float,
) -> None:  # fmt: skip
    connection = await pool.get()  # None: a free slot without an open connection
    try:
        started = time.monotonic()
        if connection is None:
            connection = await asyncio.wait_for(
                asyncio.open_connection(target.address, target.port), timeout
            )
        reader, writer = connection
        writer.write(target.request())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = head.split(b" ", 2)[1]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await asyncio.wait_for(reader.readexactly(length), timeout)
        results.latencies.append(time.monotonic() - started)
        if status != b"200":
            results.fail(f"HTTP {status.decode()}")
        elif json.loads(body).get("peer") != SPIFFE_ID:
            results.fail(f"peer {json.loads(body).get('peer')!r}")
        if b"connection: close" in head.lower():
            writer.close()
            connection = None
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        results.fail(type(exc).__name__)
        if connection is not None:
            connection[1].close()
        connection = None
    finally:
        pool.put_nowait(connection)


async def load(
    target: Target, rate: float, seconds: float, connections: int, timeout: float
) -> Results:
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(None)
    results = Results()
    total = int(rate * seconds)
    start = time.monotonic()
    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay > LATE:
            results.late += 1
        tasks.append(asyncio.create_task(one_request(target, pool, results, timeout)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        connection = pool.get_nowait()
        if connection is not None:
            connection[1].close()
    return results


def answers(target: Target) -> bool:
    """One request, answered as the load expects (the endpoint is healthy, Envoy has it)."""
    results = asyncio.run(load(target, 1, 1, 1, 2))
    return bool(results.latencies) and not results.failures


def tls_counters(stats: dict[str, int]) -> dict[str, int]:
    """SDS updates of Envoy's TLS contexts, and mTLS handshakes, summed over listeners and
    clusters."""
    out = {"sds_updates": 0, "handshakes_in": 0, "handshakes_out": 0, "ssl_errors": 0}
    for name, value in stats.items():
        if name.endswith("ssl_context_update_by_sds"):
            out["sds_updates"] += value
        elif name.startswith("listener.") and name.endswith(".ssl.handshake"):
            out["handshakes_in"] += value
        elif name.startswith("cluster.outbound|") and name.endswith(".ssl.handshake"):
            out["handshakes_out"] += value
        elif ".ssl.fail_verify" in name or name.endswith(".ssl.connection_error"):
            out["ssl_errors"] += value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration (60)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (200)")
    parser.add_argument("--ttl", default="10s", help="certificate lifetime, SECRET_TTL (10s)")
    parser.add_argument("--connections", type=int, default=32, help="client connections (32)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per request, seconds (5)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.seconds * args.rate > 200_000:
        raise SystemExit("at most 200000 requests per run")
    enter_own_netns()
    workdir = Path(tempfile.mkdtemp(prefix="vmagent-rotation-"))
    procs = Procs(workdir)
    try:
        shutil.copytree(ROOT / "examples" / "devmesh", workdir / "mesh")
        env = base_env(SECRET_TTL=args.ttl, VMAGENT_DNS_UPSTREAMS="127.0.0.1:9")
        argv = vmagent("dev", "--dir", str(workdir / "dev"), "--config", str(workdir / "mesh"))
        dev = procs.start("dev", argv, env)
        wait_until(lambda: http_ok(f"{STATUS}/healthz/ready"), 60, "vmagent dev to be ready")
        target = banner_target(dev.output())
        wait_until(lambda: answers(target), 60, "a first answer through Envoy")
        before_log = dev.output().count("new certificate")
        before = tls_counters(envoy_stats(ADMIN_PORT))
        print(
            f"load: {args.rate:g} requests/s for {args.seconds:g} s to http://{target.address}:"
            f"{target.port}{target.path} (Host: {target.host}), certificates of {args.ttl}",
            flush=True,
        )
        probe = asyncio.run(load(target, args.rate, args.seconds, args.connections, args.timeout))
        after = tls_counters(envoy_stats(ADMIN_PORT))
        rotations = dev.output().count("new certificate") - before_log
        report(args, probe, rotations, {k: after[k] - before[k] for k in after})
        if dev.popen.poll() is not None:
            raise SystemExit(f"vmagent dev exited:\n{dev.output()[-3000:]}")
    finally:
        procs.close()
        if args.keep:
            print(f"work directory: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(args: argparse.Namespace, results: Results, rotations: int, tls: dict[str, int]) -> None:
    sent = int(args.rate * args.seconds)
    failed = sum(results.failures.values())
    lat = results.latencies or [float("nan")]
    print(f"requests {sent}, answered {len(results.latencies)}, failed {failed} {results.failures}")
    print(
        f"latency ms: p50 {percentile(lat, 0.5) * 1000:.2f}  p99 {percentile(lat, 0.99) * 1000:.2f}"
        f"  max {max(lat) * 1000:.2f}; sent late (>{LATE * 1000:.0f} ms): {results.late}"
    )
    print(
        f"rotations during the load: {rotations} (agent), Envoy SDS context updates "
        f"{tls['sds_updates']}, new mTLS handshakes in {tls['handshakes_in']} / out "
        f"{tls['handshakes_out']}, TLS errors {tls['ssl_errors']}"
    )
    verdict = "meets" if failed == 0 else "MISSES"
    print(f"failed requests: {failed}; target 0: {verdict}")
    print(
        json.dumps(
            {
                "failed": failed,
                "p50_ms": round(percentile(lat, 0.5) * 1000, 2),
                "p99_ms": round(percentile(lat, 0.99) * 1000, 2),
                "rotations": rotations,
                **tls,
            }
        )
    )


if __name__ == "__main__":
    main()
