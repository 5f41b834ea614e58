#!/usr/bin/env python3
"""Footprint: the agent's memory and idle CPU with a 10k-name table, without and with Envoy.

    sudo .venv/bin/python bench/footprint_bench.py [--seconds 60] [--names 10000] [--ports]

Generates a devmesh config of ``--names`` Kubernetes services (``svc<i>.bench.svc.cluster.local``
with a VIP each: a NameTable of that many entries) plus the VM's group, starts
``vmagent devmesh serve`` on loopback, then twice ``vmagent run`` as an onboarded VM:

1. ``VMAGENT_ENVOY=false``: the agent process alone;
2. ``VMAGENT_ENVOY=true``: the agent and its Envoy.

Each time it waits until the agent is ready and its DNS proxy holds the whole table, lets it
settle 5 s, then samples for ``--seconds`` (an idle minute by default: no requests, no DNS
queries): RSS at the end and its maximum (psutil, sampled every second), and CPU as a percentage
of one core (user + system CPU seconds over the window / its length). With ``--ports`` each
service also has an HTTP port, so Envoy holds as many clusters, routes and endpoints as names.

Runs in a network namespace of its own (root): see ``mesh_bench_lib``."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mesh_bench_lib import (
    Devmesh,
    Procs,
    agent_home,
    enter_own_netns,
    http_json,
    http_ok,
    many_services_yaml,
    process_tree_usage,
    start_devmesh,
    vm_yaml,
    vmagent,
    wait_until,
)

SETTLE = 5.0
MIB = 1024 * 1024


def measure(procs: Procs, mesh: Devmesh, names: int, envoy: bool, seconds: float) -> dict[str, Any]:
    label = "agent+envoy" if envoy else "agent"
    home = agent_home(mesh, procs.workdir / label, "127.0.1.1", envoy)
    proc = procs.start(label, vmagent("run"), home.env)
    started = time.monotonic()

    def loaded() -> bool:
        if proc.popen.poll() is not None:
            raise SystemExit(f"agent exited:\n{proc.output()[-3000:]}")
        status = http_json(f"{home.status_url}/status")
        entries = int(status["dns"]["counters"]["table_entries"])
        return entries >= names and http_ok(f"{home.status_url}/healthz/ready")

    wait_until(loaded, 120, f"{label}: ready with {names} names", every=0.2)
    ready = time.monotonic() - started
    time.sleep(SETTLE)
    status = http_json(f"{home.status_url}/status")
    envoy_pid = (status.get("envoy") or {}).get("pid") if envoy else None
    pids = [proc.popen.pid] + ([int(envoy_pid)] if envoy_pid else [])
    first = process_tree_usage(pids)
    peak = {pid: usage[0] for pid, usage in first.items()}
    window_start = time.monotonic()
    while time.monotonic() - window_start < seconds:
        time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - window_start))))
        for pid, (rss, _) in process_tree_usage(pids).items():
            peak[pid] = max(peak.get(pid, 0), rss)
    window = time.monotonic() - window_start
    last = process_tree_usage(pids)
    table = http_json(f"{home.status_url}/status")["dns"]["counters"]["table_entries"]
    proc.stop(20)
    rows = {}
    for pid, name in zip(pids, ["agent", "envoy"]):
        rss, cpu = last[pid]
        rows[name] = {
            "rss_mib": round(rss / MIB, 1),
            "peak_rss_mib": round(peak[pid] / MIB, 1),
            "cpu_percent": round(100 * (cpu - first[pid][1]) / window, 2),
        }
    return {"label": label, "ready_s": round(ready, 2), "table": table, "processes": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="idle window (60)")
    parser.add_argument("--names", type=int, default=10_000, help="services in the table")
    parser.add_argument("--ports", action="store_true", help="an HTTP port on every service")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if not 1 <= args.names <= 100_000:
        raise SystemExit("--names: 1..100000")
    enter_own_netns()
    workdir = Path(tempfile.mkdtemp(prefix="vmagent-footprint-"))
    mesh_dir = workdir / "mesh"
    mesh_dir.mkdir()
    (mesh_dir / "vm.yaml").write_text(vm_yaml())
    (mesh_dir / "services.yaml").write_text(many_services_yaml(args.names, args.ports))
    procs = Procs(workdir)
    try:
        mesh = start_devmesh(procs, mesh_dir, timeout=120)
        results = [measure(procs, mesh, args.names, envoy, args.seconds) for envoy in (False, True)]
    finally:
        procs.close()
        if args.keep:
            print(f"work directory: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    ports = "with an HTTP port each" if args.ports else "VIPs only"
    print(f"{args.names} services ({ports}); idle window {args.seconds:g} s")
    print(f"{'run':<12} {'process':<7} {'RSS MiB':>8} {'peak MiB':>9} {'CPU %':>6}  ready s")
    for result in results:
        for name, row in result["processes"].items():
            print(
                f"{result['label']:<12} {name:<7} {row['rss_mib']:>8.1f} "
                f"{row['peak_rss_mib']:>9.1f} {row['cpu_percent']:>6.2f}  {result['ready_s']}"
            )
        total = sum(row["rss_mib"] for row in result["processes"].values())
        cpu = sum(row["cpu_percent"] for row in result["processes"].values())
        print(f"{result['label']:<12} {'total':<7} {total:>8.1f} {'':>9} {cpu:>6.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
