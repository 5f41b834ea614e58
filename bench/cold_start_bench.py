#!/usr/bin/env python3
"""Cold start: ``vmagent run`` start -> ready, against ``vmagent devmesh serve`` on loopback.

    sudo .venv/bin/python bench/cold_start_bench.py [--runs 10] [--no-envoy]

Each run is a VM that was just onboarded: fresh directories (no certificate, no stored
NameTable), a new bootstrap token, and its own address (``127.0.1.<n>``, so each run registers a
new WorkloadEntry). The clock starts just before the process is spawned (Python start-up and
imports count) and stops when

- ``/healthz/ready`` answers 200: a workload certificate, the control plane connected, the
  NameTable loaded, Envoy LIVE (``/server_info`` LIVE and CDS + LDS ``update_success > 0``);
- and devmesh's ``/debug/registry`` lists the run's WorkloadEntry (registered).

Both are polled every 5 ms. The agent is then stopped (SIGTERM; ``terminationDrainDuration``
0 s) before the next run. Prints each run and the median; the target is a median <= 2 s.
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
    median,
    start_devmesh,
    vm_yaml,
    vmagent,
)

TARGET_SECONDS = 2.0
TIMEOUT = 30.0


def one_run(procs: Procs, mesh: Devmesh, index: int, envoy: bool) -> dict[str, Any]:
    home = agent_home(
        mesh,
        procs.workdir / f"agent{index}",
        f"127.0.1.{index + 1}",
        envoy,
        proxy_config={"terminationDrainDuration": "0s"},
    )
    start = time.monotonic()
    proc = procs.start(f"agent{index}", vmagent("run"), home.env)
    ready_at = registered_at = None
    deadline = start + TIMEOUT
    while (ready_at is None or registered_at is None) and time.monotonic() < deadline:
        now = time.monotonic()
        if ready_at is None and http_ok(f"{home.status_url}/healthz/ready"):
            ready_at = now - start
        if registered_at is None and mesh.registered(home.entry_name):
            registered_at = now - start
        if proc.popen.poll() is not None:
            raise SystemExit(f"agent exited ({proc.popen.returncode}):\n{proc.output()[-3000:]}")
        time.sleep(0.005)
    if ready_at is None or registered_at is None:
        raise SystemExit(f"run {index}: not ready within {TIMEOUT:g}s:\n{proc.output()[-3000:]}")
    status = http_json(f"{home.status_url}/status")
    envoy_state = (status.get("envoy") or {}).get("state") if envoy else "off"
    stopped = time.monotonic()
    code = proc.stop(20)
    if code != 0:
        raise SystemExit(f"agent exit status {code}:\n{proc.output()[-3000:]}")
    return {
        "ready": ready_at,
        "registered": registered_at,
        "both": max(ready_at, registered_at),
        "stop": time.monotonic() - stopped,
        "envoy": envoy_state,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="number of cold starts (10)")
    parser.add_argument("--no-envoy", action="store_true", help="VMAGENT_ENVOY=false")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    enter_own_netns()
    workdir = Path(tempfile.mkdtemp(prefix="vmagent-coldstart-"))
    (workdir / "mesh").mkdir()
    (workdir / "mesh" / "vm.yaml").write_text(vm_yaml())
    procs = Procs(workdir)
    try:
        mesh = start_devmesh(procs, workdir / "mesh")
        results = []
        print(f"{'run':>4} {'ready s':>8} {'registered s':>13} {'both s':>7} {'stop s':>7} envoy")
        for index in range(args.runs):
            result = one_run(procs, mesh, index, not args.no_envoy)
            results.append(result)
            print(
                f"{index + 1:>4} {result['ready']:>8.3f} {result['registered']:>13.3f} "
                f"{result['both']:>7.3f} {result['stop']:>7.3f} {result['envoy']}",
                flush=True,
            )
            time.sleep(0.5)  # let devmesh settle the last disconnect
        both = [r["both"] for r in results]
        figure = median(both)
        verdict = "meets" if figure <= TARGET_SECONDS else "MISSES"
        print(
            f"cold start to ready+registered ({'agent only' if args.no_envoy else 'with Envoy'}):"
            f" median {figure:.3f} s over {len(both)} runs (min {min(both):.3f}, max "
            f"{max(both):.3f}); target <= {TARGET_SECONDS:g} s: {verdict}"
        )
        print(json.dumps({"median_s": round(figure, 3), "runs": len(both)}))
    finally:
        procs.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory: {workdir}")


if __name__ == "__main__":
    main()
