"""``vmagent run``: identity, the control-plane link, health and the DNS proxy in one process.

Start order: DNS proxy (answering from the last persisted NameTable at once, so mesh names
resolve while the control plane is unreachable), status endpoint, then identity, xDS and
health under the supervisor. SIGTERM reports unhealthy before the stream closes (traffic
drains before the WorkloadEntry goes), then stops everything; SIGHUP reloads the config
files and restarts the parts with the new config (a bad file is reported and ignored)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vmagent import __version__
from vmagent.cli import run_async
from vmagent.config import Config, ConfigError, load_config
from vmagent.dns.service import DnsProxy
from vmagent.dns.table import NameInfo, NameTableError
from vmagent.dns.tablefile import read_name_table
from vmagent.health import HealthChecker, ProbeSpecError, parse_probe
from vmagent.identity import CertificateManager, CredentialError, create_manager
from vmagent.identity.store import atomic_write
from vmagent.proxyconfig import parse_proxy_config_env
from vmagent.status import StatusServer
from vmagent.supervisor import Part, Supervisor
from vmagent.xds import (
    ChannelAuth,
    Health,
    NodeError,
    NodeInfo,
    XdsClient,
    build_node,
    name_table_document,
)

log = logging.getLogger("vmagent")

NAME_TABLE_FILE = "nametable.json"
# Istio's agent opens xDS once it holds a certificate; vmagent waits this long for the first
# one, then connects with the bearer credential alone.
FIRST_CERT_WAIT_SECONDS = 10.0


class Agent:
    def __init__(self, config: Config, node: NodeInfo) -> None:
        self.config = config
        self.node = node
        self.dns = DnsProxy(config)
        self.supervisor = Supervisor()
        self.identity: CertificateManager | None = None
        self.xds = XdsClient(config, node, self._auth, self._apply_table)
        self.status = StatusServer(self.state)
        probe = config.proxy_config.readiness_probe
        self.health = (
            HealthChecker(parse_probe(probe, where=probe_origin(config)), self.xds.report_health)
            if probe
            else None
        )
        self.table_path = Path(config.vmagent_state_dir) / NAME_TABLE_FILE
        self._table: Mapping[str, NameInfo] = {}
        self._started = time.time()
        self.final_health: Health | None = Health(False, "vmagent is stopping")
        self._have_cert = asyncio.Event()

    # --- parts ---

    async def _run_identity(self) -> None:
        if self.identity is None:
            self.identity = await create_manager(self.config, self.config.dynamic)
            self.identity.subscribe(lambda _bundle: self._have_cert.set())
        await self.identity.run()

    async def _auth(self) -> ChannelAuth:
        """The xDS stream authenticates like the CA client: the workload cert once there is
        one, and the platform credential as bearer token while it can be had."""
        if not self._have_cert.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._have_cert.wait(), FIRST_CERT_WAIT_SECONDS)
        manager = self.identity
        if manager is None:
            raise RuntimeError("identity not initialised yet")
        now = time.time()
        client_cert = manager.client_cert(now)
        token: str | None = None
        try:
            token = (await manager.provider.fetch(now)).token
        except CredentialError:
            if client_cert is None:
                raise
        return ChannelAuth(client_cert, token)

    async def _apply_table(self, table: Mapping[str, NameInfo]) -> None:
        await self.dns.update_table(table)
        self._table = table
        data = json.dumps(name_table_document(table), indent=1, sort_keys=True).encode()
        try:
            await asyncio.to_thread(atomic_write, self.table_path, data, 0o644)
        except OSError as exc:
            log.warning("cannot persist the name table to %s: %s", self.table_path, exc)

    def _load_persisted_table(self) -> dict[str, NameInfo] | None:
        if not self.table_path.exists():
            return None
        try:
            return read_name_table(str(self.table_path))
        except NameTableError as exc:
            log.warning("ignoring the persisted name table: %s", exc)
            return None

    # --- lifecycle ---

    async def run(self, stop: asyncio.Event) -> None:
        os.makedirs(self.config.vmagent_state_dir, mode=0o755, exist_ok=True)
        await self.dns.start()
        persisted = self._load_persisted_table()
        if persisted is not None:
            log.info("answering from the persisted name table until the control plane speaks")
            self._table = persisted
            await self.dns.update_table(persisted)
        await self._listen_status()
        parts: dict[str, Part] = {
            "identity": self._run_identity,
            "xds": self.xds.run,
            "dns": self.dns.watch_resolv_conf,
        }
        if self.health is not None:
            parts["health"] = self.health.run
        supervised = asyncio.ensure_future(self.supervisor.run(parts))
        try:
            await stop.wait()
            if self.final_health is not None:
                log.info("stopping: reporting unhealthy, then closing the control-plane stream")
            await self.xds.close(self.final_health)
        finally:
            supervised.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervised
            await self.status.close()
            await self.dns.close()

    async def _listen_status(self) -> None:
        host, _, port = self.config.vmagent_status_addr.rpartition(":")
        try:
            await self.status.listen_tcp(host.strip("[]") or "127.0.0.1", int(port))
        except (OSError, ValueError) as exc:
            log.warning("status endpoint %s unavailable: %s", self.config.vmagent_status_addr, exc)
        run_dir = self.config.vmagent_run_dir
        try:
            os.makedirs(run_dir, mode=0o755, exist_ok=True)
            await self.status.listen_unix(os.path.join(run_dir, "status.sock"))
        except OSError as exc:
            log.warning("status socket in %s unavailable: %s", run_dir, exc)

    # --- state ---

    def not_ready(self) -> list[str]:
        reasons = []
        bundle = self.identity.current if self.identity else None
        if bundle is None or bundle.not_after <= time.time():
            reasons.append("no valid workload certificate")
        if not self.xds.status.connected_once:
            reasons.append("control plane not connected yet")
        if self.dns.not_ready_reason:
            reasons.append(self.dns.not_ready_reason)
        return reasons

    def state(self) -> dict[str, Any]:
        reasons = self.not_ready()
        return {
            "version": __version__,
            "node": {"id": self.node.id, "ips": list(self.node.ips)},
            "started": self._started,
            "ready": not reasons,
            "not_ready": reasons,
            "identity": self.identity.status() if self.identity else None,
            "xds": self.xds.status.snapshot(),
            "dns": {
                "ready": self.dns.ready,
                "upstreams": [f"{h}:{p}" for h, p in self.dns.upstreams],
                "search": list(self.dns.search),
                "listening": [f"{h}:{p}" for h, p in self.dns.server.addresses],
                "counters": self.dns.core.counters.snapshot(),
                "cache_entries": len(self.dns.core.cache),
            },
            "health": self.health.status().as_dict() if self.health else None,
            "parts": self.supervisor.snapshot(),
            "name_table": name_table_document(self._table),
        }


def probe_origin(config: Config) -> str:
    """Where the readiness probe came from, for errors: PROXY_CONFIG replaces mesh.yaml's."""
    if "readinessProbe" in parse_proxy_config_env(config.proxy_config_env):
        return "PROXY_CONFIG: readinessProbe"
    mesh = config.vmagent_mesh_config or str(Path(config.vmagent_config_dir) / "mesh.yaml")
    return f"{mesh}: defaultConfig.readinessProbe"


def host_addresses() -> list[str]:
    """The host's addresses (``ip -j addr``; the resolver's view of the hostname otherwise)."""
    try:
        out = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
        return [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        with contextlib.suppress(OSError):
            return [str(ai[4][0]) for ai in socket.getaddrinfo(socket.gethostname(), None)]
        return []


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run the agent: identity, control-plane link, health probes, DNS proxy",
        description="Run vmagent on this VM with the configuration from cluster.env, mesh.yaml "
        "and the environment (see `vmagent config show`). SIGTERM stops it gracefully, SIGHUP "
        "reloads the configuration files.",
    )
    parser.set_defaults(run=run_command)


def build_agent(config: Config) -> Agent:
    """An agent for ``config`` (NodeError / ProbeSpecError when the config cannot work)."""
    return Agent(config, build_node(config, socket.gethostname(), host_addresses()))


def run_command(args: argparse.Namespace, config: Config) -> int:
    try:
        agent = build_agent(config)
    except (NodeError, ProbeSpecError) as exc:
        print(f"vmagent run: {exc}", file=sys.stderr)
        return 2
    # OSError/ValueError: cannot bind, cannot create the state dir, ...
    return run_async("run", serve(agent, lambda: reload_config(args)), (OSError, ValueError))


def reload_config(args: argparse.Namespace) -> Config:
    overrides = args.overrides(args) if getattr(args, "overrides", None) else None
    return load_config(os.environ, overrides=overrides, cluster_env=args.cluster_env)


async def serve(agent: Agent, reload: Callable[[], Config]) -> int:
    """Run until SIGTERM/SIGINT; on SIGHUP rebuild the agent from reloaded config files."""
    loop = asyncio.get_running_loop()
    terminate = asyncio.Event()
    hangup = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, hangup.set)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, terminate.set)
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
                running.result()  # an exception here is a startup failure: let it surface
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
