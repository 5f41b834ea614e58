"""``vmagent run``: the command, its signals (SIGTERM/SIGINT stop, SIGHUP reloads) and exit
codes (0 stopped, 1 a part failed to start, 2 a permanent misconfiguration). The agent itself is
:class:`vmagent.agent.Agent`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from vmagent.agent import Agent, build_agent
from vmagent.cli import run_async
from vmagent.config import Config, ConfigError, load_config
from vmagent.health import ProbeSpecError
from vmagent.xds import NodeError

log = logging.getLogger("vmagent")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run the agent: identity, control-plane link, health probes, DNS proxy",
        description="Run vmagent on this VM with the configuration from cluster.env, mesh.yaml "
        "and the environment (see `vmagent config show`). SIGTERM stops it gracefully, SIGHUP "
        "reloads the configuration files.",
    )
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace, config: Config) -> int:
    try:
        agent = build_agent(config)
    except (NodeError, ProbeSpecError, ConfigError) as exc:
        print(f"vmagent run: {exc}", file=sys.stderr)
        return 2
    # OSError/ValueError: cannot bind, cannot create the state dir, ...
    return run_async("run", serve(agent, lambda: reload_config(args)), (OSError, ValueError))


def reload_config(args: argparse.Namespace) -> Config:
    overrides = args.overrides(args) if getattr(args, "overrides", None) else None
    return load_config(
        os.environ,
        overrides=overrides,
        cluster_env=args.cluster_env,
        flags=getattr(args, "flags", None),
    )


async def serve(agent: Agent, reload: Callable[[], Config]) -> int:
    """Run until SIGTERM/SIGINT; on SIGHUP rebuild the agent from reloaded config files."""
    loop = asyncio.get_running_loop()
    terminate = asyncio.Event()
    hangup = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, hangup.set)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, terminate.set)
    # A Ctrl-C during the caller's startup (cli.run_async's handler cancels this task) whose
    # CancelledError a library swallowed: honour it rather than lose it (3.11+ counts them).
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    if cancelling is not None and cancelling():
        terminate.set()
    while True:
        stop = asyncio.Event()
        running = asyncio.ensure_future(agent.run(stop))
        while True:
            waits = [running, asyncio.ensure_future(terminate.wait())]
            waits.append(asyncio.ensure_future(hangup.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits[1:]:
                waiter.cancel()
            if running.done():
                try:
                    running.result()  # an exception here is a startup failure: let it surface
                except ConfigError as exc:  # permanent: exit 2 and no retry (systemd too)
                    print(f"vmagent: configuration error: {exc}", file=sys.stderr)  # as cli.py
                    return 2
                return 1
            if terminate.is_set():
                stop.set()
                await running
                return 0
            hangup.clear()
            try:
                fresh = build_agent(reload())
            except (ConfigError, NodeError, ProbeSpecError) as exc:
                log.error("SIGHUP: keeping the running configuration: %s", exc)
                continue
            log.info("SIGHUP: configuration reloaded, restarting the parts")
            agent.final_health = None  # a reload is not a shutdown: do not report unhealthy
            stop.set()
            await running
            agent = fresh
            break
