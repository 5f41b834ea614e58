#!/usr/bin/env python3
"""Certificate rotation under load between two VMs in network namespaces, through both Envoys.

    sudo .venv/bin/python bench/two_vms_bench.py [--seconds 60] [--rate 200] [--ttl 10s]

Builds the topology of tests/e2e/test_e2e_two_vms.py (tests/e2e/two_vms.py): devmesh at
10.77.0.1, VM-A and VM-B each running ``vmagent run`` with traffic capture and real Envoy, with
``SECRET_TTL=--ttl`` (each workload certificate lives 10 s; the agents rotate at half life,
about every 5 s, and push each one to Envoy over SDS). Then, from VM-A as a captured process:

1. direct (after 1 s of warm-up): ``--rate`` requests/s for ``--direct-seconds`` to VM-B's
   app on its uncaptured port 8081 (no Envoy): the baseline;
2. mesh: ``--rate`` requests/s for ``--seconds`` to ``http://backend.two.svc.cluster.local:8080/``
   (the VIP, captured to VM-A's Envoy, Istio mTLS to VM-B's Envoy, then the app).

Open loop (request *i* due at ``i / rate`` s) over a pool of keep-alive connections. A mesh
request fails when it errors, times out, answers other than 200, or the app did not see VM-A's
SPIFFE ID in ``x-forwarded-client-cert``. Prints failures (target 0), p50/p99 of both runs and
the difference (the added latency of the two Envoys), and the rotations seen (serial changes
of both agents' certificates during the load). Runs as root; every namespace is removed after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "tests"), str(ROOT / "bench")]

from e2e_helpers import own_network_namespace  # noqa: E402
from mesh_bench_lib import percentile  # noqa: E402
from two_vms import (  # noqa: E402
    BACKEND,
    BACKEND_VIP,
    DIRECT_PORT,
    VM_IPS,
    TwoVms,
    skip_reason,
    wait_until,
)

CLIENT_ID = b"URI=spiffe://cluster.local/ns/two/sa/client"
LATE = 0.050
CLONE_NEWNET = 0x40000000


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    late: int = 0

    def fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def one_request(
    address: str, port: int, host: str, pool: asyncio.Queue[Conn | None], results: Results,
    timeout: float, want: bytes | None,
) -> None:  # fmt: skip
    connection = await pool.get()  # None: a free slot without an open connection
    try:
        started = time.monotonic()
        if connection is None:
            connection = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
        reader, writer = connection
        writer.write(f"GET /whoami HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
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
        elif want is not None and want not in body:
            results.fail("caller's SPIFFE ID not seen by the app")
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
    address: str, port: int, host: str, rate: float, seconds: float, connections: int,
    timeout: float, want: bytes | None,
) -> Results:  # fmt: skip
    pool: asyncio.Queue[Conn | None] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(None)
    results = Results()
    start = time.monotonic()
    tasks = []
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay > LATE:
            results.late += 1
        tasks.append(
            asyncio.create_task(one_request(address, port, host, pool, results, timeout, want))
        )
    await asyncio.gather(*tasks)
    while not pool.empty():
        connection = pool.get_nowait()
        if connection is not None:
            connection[1].close()
    return results


def in_netns(netns: str, work: object) -> Results:
    """Run ``work()`` in a thread moved into ``netns`` (as root, gid 0: a captured process)."""
    out: list[Results] = []
    errors: list[BaseException] = []

    def body() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {netns}")
        finally:
            os.close(fd)
        try:
            out.append(work())  # type: ignore[operator]
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


class SerialWatch:
    """Counts certificate serial changes of both agents (their /status) while running."""

    def __init__(self, two: TwoVms) -> None:
        self.two = two
        self.changes = {key: 0 for key in VM_IPS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _serials(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for key, vm in self.two.vms.items():
            status = vm.status()
            out[key] = (status.get("identity") or {}).get("serial") if status else None
        return out

    def _run(self) -> None:
        last = self._serials()
        while not self._stop.wait(0.5):
            now = self._serials()
            for key, serial in now.items():
                if serial and last.get(key) and serial != last[key]:
                    self.changes[key] += 1
                if serial:
                    last[key] = serial

    def __enter__(self) -> SerialWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def summary(name: str, results: Results, sent: int) -> dict[str, float]:
    lat = results.latencies or [float("nan")]
    failed = sum(results.failures.values())
    p50, p99 = percentile(lat, 0.5) * 1000, percentile(lat, 0.99) * 1000
    print(
        f"{name:<7} requests {sent}, answered {len(results.latencies)}, failed {failed}"
        f" {results.failures or ''}; latency ms p50 {p50:.2f} p99 {p99:.2f}"
        f" max {max(lat) * 1000:.2f}; sent late (>{LATE * 1000:.0f} ms): {results.late}"
    )
    return {"failed": failed, "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="mesh load, seconds (60)")
    parser.add_argument("--direct-seconds", type=float, default=10.0, help="baseline (10)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (200)")
    parser.add_argument("--ttl", default="10s", help="certificate lifetime, SECRET_TTL (10s)")
    parser.add_argument("--connections", type=int, default=16, help="client connections (16)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per request, seconds (5)")
    args = parser.parse_args()
    if (args.seconds + args.direct_seconds) * args.rate > 100_000:
        raise SystemExit("at most 100000 requests per run")
    reason = skip_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    with own_network_namespace():
        two = TwoVms.create()
        try:
            two.build()
            two.start(SECRET_TTL=args.ttl)
            a = two.vms["a"]
            url = f"http://{BACKEND}:8080/"
            wait_until("a first answer through both Envoys", lambda: a.curl(url)[0] == 200, 30)

            def run(address: str, port: int, seconds: float, want: bytes | None) -> Results:
                return asyncio.run(
                    load(address, port, BACKEND, args.rate, seconds, args.connections,
                         args.timeout, want)
                )  # fmt: skip

            b_ip = VM_IPS["b"]
            in_netns(a.netns, lambda: run(b_ip, DIRECT_PORT, 1, None))  # warm-up, not counted
            print(f"direct: {args.rate:g}/s for {args.direct_seconds:g} s to {b_ip}:{DIRECT_PORT}")
            direct = in_netns(a.netns, lambda: run(b_ip, DIRECT_PORT, args.direct_seconds, None))
            print(
                f"mesh: {args.rate:g}/s for {args.seconds:g} s to {url} (VIP {BACKEND_VIP}),"
                f" certificates of {args.ttl}",
                flush=True,
            )
            with SerialWatch(two) as watch:
                mesh = in_netns(a.netns, lambda: run(BACKEND_VIP, 8080, args.seconds, CLIENT_ID))
            d = summary("direct", direct, int(args.rate * args.direct_seconds))
            m = summary("mesh", mesh, int(args.rate * args.seconds))
            added = {k: round(m[k] - d[k], 2) for k in ("p50_ms", "p99_ms")}
            print(
                f"added by the two Envoys: p50 {added['p50_ms']:.2f} ms, p99"
                f" {added['p99_ms']:.2f} ms; rotations during the load: VM-A"
                f" {watch.changes['a']}, VM-B {watch.changes['b']}"
            )
            verdict = "meets" if m["failed"] == 0 else "MISSES"
            print(f"failed requests: {m['failed']}; target 0: {verdict}")
            print(json.dumps({"direct": d, "mesh": m, "added": added, "rotations": watch.changes}))
            for vm in two.vms.values():
                if vm.agent is not None and vm.agent.poll() is not None:
                    raise SystemExit(f"VM-{vm.key} agent exited:\n{vm.log()[-3000:]}")
        finally:
            with contextlib.suppress(Exception):
                two.close()


if __name__ == "__main__":
    main()
