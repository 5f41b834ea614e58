"""``dns_table_bench.py --nds``: a 100k-service NameTable pushed to ``vmagent run`` over NDS.

The agent runs as the e2e tests run it (``tests/e2e/e2e_helpers.py``: devmesh is its CA, a
dnsmasq its DNS upstream, ``VMAGENT_ENVOY=false``), but its xDS stream goes to a scripted ADS
upstream (``tests/e2e/nds_upstream.py``, plaintext on a loopback port 15010; devmesh cannot load
100k services quickly). Steps: the agent gets table v0 (10/8) on connecting; once it is ready a
client queries it at ``--rate``; after ``--settle`` s, SIGUSR1 makes the upstream push v1
(11/8); the client queries until the first v1 answer, then ``--post`` s more, while a thread
fetches ``/status`` and ``/debug/ndsz`` once. Prints the waits, the swap duration, the push's
ACK, the status endpoints' times and the agent's RSS, against the targets of issue 7 §5."""

from __future__ import annotations

import argparse
import json
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from dns_table_bench import (
    HERE,
    TARGET_MAX_WAIT_MS,
    TARGET_RSS_MB,
    TARGET_SWAP_S,
    Client,
    rss_mb,
    verdict,
    waits_ms,
)


def _read_events(upstream: subprocess.Popen[str], into: list[tuple[float, str]]) -> None:
    assert upstream.stdout is not None
    for line in upstream.stdout:
        stamp, _, event = line.strip().partition(" ")
        into.append((float(stamp), event))


def _fetch(url: str, into: dict[str, tuple[float, int]], key: str) -> None:
    start = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            size = len(reply.read())
    except OSError:
        size = -1
    into[key] = (time.monotonic() - start, size)


def nds_mode(args: argparse.Namespace, workdir: Path) -> int:
    sys.path.insert(0, str(HERE.parent / "tests"))
    sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))
    import e2e_helpers as e2e
    from nds_upstream import ads_address

    ads = ads_address()
    events: list[tuple[float, str]] = []
    world = e2e.World(workdir)
    upstream: subprocess.Popen[str] | None = None
    fetched: dict[str, tuple[float, int]] = {}
    try:
        mesh = world.devmesh()  # the CA (and nothing else: xDS goes to the scripted upstream)
        argv = [
            sys.executable,
            str(HERE.parent / "tests" / "e2e" / "nds_upstream.py"),
            "--listen",
            ads,
        ]
        upstream = subprocess.Popen(
            [*argv, "--services", str(args.services)], stdout=subprocess.PIPE, text=True
        )
        assert upstream.stdout is not None
        ready, _, _ = select.select([upstream.stdout], [], [], 60)
        if not ready or "listening" not in upstream.stdout.readline():
            print("the scripted upstream did not start")
            return 1
        threading.Thread(target=_read_events, args=(upstream, events), daemon=True).start()
        extra = dict(item.split("=", 1) for item in args.agent_env)
        agent = world.agent(mesh, PROXY_CONFIG=json.dumps({"discoveryAddress": ads}), **extra)
        t_start = time.monotonic()
        proc = agent.start()
        agent.wait_ready(timeout=args.timeout + 60)  # the DNS proxy holds table v0 by then
        print(f"  agent ready with table v0 {time.monotonic() - t_start:.1f} s after start")
        host, _, port = agent.dns.rpartition(":")
        client = Client(int(port), args.services, args.rate, host=host)
        if client.run_until(time.monotonic() + args.timeout, stop_when_version=0) is None:
            print("  table v0 never answered")
            return 1
        client.run_until(time.monotonic() + args.settle)
        rss_before, hwm_before = rss_mb(proc.popen.pid)

        swap_at = time.monotonic()
        upstream.send_signal(signal.SIGUSR1)
        swapped = client.run_until(swap_at + args.timeout, stop_when_version=1)
        end = (swapped or swap_at + args.timeout) + args.post
        status_url = agent.status_url
        for key, path in (("/status", "/status"), ("/debug/ndsz", "/debug/ndsz")):
            threading.Thread(target=_fetch, args=(status_url + path, fetched, key)).start()
        client.run_until(end)
        client.drain()
        rss_after, hwm_after = rss_mb(proc.popen.pid)
    finally:
        if upstream is not None:
            upstream.terminate()
            upstream.wait(10)
        world.close()

    samples = client.samples
    pushed = next((t for t, e in events if e.startswith("pushed v1")), None)
    acked = next((t for t, e in events if e == "ack v1"), None)
    nacks = [e for _, e in events if e.startswith("nack")]
    overall = waits_ms(samples, swap_at, end)
    print()
    print(f"{'window':<28}{'queries':>8}{'max ms':>10}{'p99 ms':>10}")
    for label, (mx, p99, n) in (
        (f"before push ({args.settle:g} s)", waits_ms(samples, swap_at - args.settle, swap_at)),
        ("during push + swap", waits_ms(samples, swap_at, swapped or end)),
        (f"after swap ({args.post:g} s)", waits_ms(samples, swapped or end, end)),
    ):
        print(f"{label:<28}{n:>8}{mx:>10.1f}{p99:>10.1f}")
    print()
    swap_s = (swapped - swap_at) if swapped else float("inf")
    since_push = f"{swapped - pushed:.2f} s" if swapped and pushed else "-"
    ack_s = f"{acked - pushed:.2f} s" if acked and pushed else "never"
    rows = [
        ("max query wait, push+after", f"{overall[0]:.1f} ms", f"<= {TARGET_MAX_WAIT_MS:g} ms",
         overall[0] <= TARGET_MAX_WAIT_MS),
        ("p99 query wait, push+after", f"{overall[1]:.1f} ms", "", True),
        ("swap duration (signal)", f"{swap_s:.2f} s", f"<= {TARGET_SWAP_S:g} s",
         swap_s <= TARGET_SWAP_S),
        ("  from the push's send", since_push, "", True),
        ("ACK after the push's send", ack_s, "", True),
        ("RSS, table v0", f"{rss_before:.0f} MB", f"<= {TARGET_RSS_MB:g} MB",
         rss_before <= TARGET_RSS_MB),
        ("RSS, after the swap", f"{rss_after:.0f} MB", f"<= {TARGET_RSS_MB:g} MB",
         rss_after <= TARGET_RSS_MB),
        ("peak RSS (VmHWM)", f"{max(hwm_before, hwm_after):.0f} MB", "", True),
    ]  # fmt: skip
    for label, value, target, ok in rows:
        print(f"{label:<28}{value:>10}  {target:<12}{verdict(ok) if target else ''}")
    for key, (seconds, size) in sorted(fetched.items()):
        print(f"{'GET ' + key:<28}{seconds * 1000:>7.0f} ms  {size / 1e6:.1f} MB")
    if nacks:
        print("WARNING: NACKs:", "; ".join(nacks))
    if args.keep:
        print("agent log:", workdir)
    return 0
