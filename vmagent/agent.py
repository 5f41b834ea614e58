"""``vmagent run``: identity, the control-plane link, health, the DNS proxy and Envoy in one
process.

Start order (reference §6): DNS proxy (answering from the last persisted NameTable at once, so
mesh names resolve while the control plane is unreachable), status endpoint, then, unless
``VMAGENT_ENVOY=false``, SDS and the xDS proxy listening (:mod:`vmagent.agent_envoy`); then
identity, xDS, health and Envoy (bootstrap written, then started) under the supervisor.
SIGTERM reports unhealthy before anything closes (traffic drains before the WorkloadEntry
goes), drains Envoy, then closes the upstream stream and stops everything; SIGHUP reloads the
config files and restarts the parts with the new config (a bad file is reported and
ignored)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmagent import __version__
from vmagent.agent_capture import AgentCapture
from vmagent.config import Config
from vmagent.config_values import split_host_port
from vmagent.dns.service import DnsProxy, give_back_free_memory
from vmagent.dns.table import NameInfo, NameTableError
from vmagent.dns.tablebuild import write_table_json
from vmagent.dns.tablefile import read_name_table
from vmagent.health import HealthChecker, parse_probe
from vmagent.identity import CertificateManager, CredentialError, create_manager
from vmagent.proxyconfig import parse_proxy_config_env
from vmagent.status import ReadinessLog, StatusServer
from vmagent.status.metrics import AgentMetrics, EnvoyAdmin
from vmagent.status.notify import Notifier
from vmagent.status.view import workload_entry_name
from vmagent.supervisor import Part, Supervisor
from vmagent.xds import (
    ChannelAuth,
    Health,
    NodeInfo,
    XdsClient,
    build_node,
    upstream_kind,
)

if TYPE_CHECKING:
    from vmagent.agent_envoy import DataPlane

log = logging.getLogger("vmagent")

NAME_TABLE_FILE = "nametable.json"
# Istio's agent opens xDS once it holds a certificate; vmagent waits this long for the first
# one, then connects with the bearer credential alone.
FIRST_CERT_WAIT_SECONDS = 10.0
READINESS_POLL_SECONDS = 0.5  # how often readiness is re-evaluated for the log


class Agent:
    def __init__(self, config: Config, node: NodeInfo) -> None:
        self.config = config
        self.node = node
        self.dns = DnsProxy(config)
        self.supervisor = Supervisor()
        self.identity: CertificateManager | None = None
        self.xds = XdsClient(
            config,
            node,
            self._auth,
            self._apply_table,
            kind=upstream_kind(config),
            on_nds=self._apply_nds,
        )
        self.capture = AgentCapture(config)  # iptables capture when cluster.env asks
        # Envoy's SDS, xDS proxy and supervisor; None: DNS and identity only.
        self.dataplane: DataPlane | None = None
        if config.vmagent_envoy:  # imported only then: Envoy's modules are ~3 MB of RSS
            from vmagent.agent_envoy import DataPlane

            self.dataplane = DataPlane(config, node, self.xds)
        self.metrics = AgentMetrics(self.state, self._envoy_admin)
        self.status = StatusServer(
            self.state, ndsz=self.dns.table_document, metrics=self.metrics.render
        )
        probe = config.proxy_config.readiness_probe
        pre_checks = [self.dataplane.pre_check] if self.dataplane else []
        self.health = (
            HealthChecker(
                parse_probe(probe, where=probe_origin(config)),
                self._report_health,
                pre_checks=pre_checks,
            )
            if probe
            else None
        )
        self.table_path = Path(config.vmagent_state_dir) / NAME_TABLE_FILE
        self._started = time.time()
        self.final_health: Health | None = Health(False, "vmagent is stopping")
        self._have_cert = asyncio.Event()
        self._status_socket: str | None = None  # the Unix socket listened on, to remove
        self.notify = Notifier(os.environ)  # systemd's Type=notify, when under systemd

    # --- parts ---

    async def _run_identity(self) -> None:
        if self.identity is None:
            self.identity = await create_manager(self.config, self.config.dynamic)
            self.identity.subscribe(lambda _bundle: self._have_cert.set())
            if self.dataplane is not None:  # SDS: the certificate on disk, then every rotation
                if self.identity.current is not None:
                    self.dataplane.certs.publish(self.identity.current)
                self.identity.subscribe(self.dataplane.certs.publish)
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
        return ChannelAuth(client_cert, token, manager.client_cert_refused)

    async def _apply_nds(self, data: bytes) -> None:
        """A pushed NameTable, still serialized: checked, built and persisted by a child
        process (the agent keeps no per-entry objects; issue 7 §5); NameTableError: NACK."""
        await self.dns.update_from_nds(data, persist=str(self.table_path))

    async def _apply_table(self, table: Mapping[str, NameInfo]) -> None:
        """A table decoded here (XdsClient without ``on_nds``)."""
        await self.dns.update_table(table)
        try:  # serialised off the event loop too: ~1 s for 100k entries
            await asyncio.to_thread(write_table_json, str(self.table_path), table)
        except OSError as exc:
            log.warning("cannot persist the name table to %s: %s", self.table_path, exc)
        give_back_free_memory()

    async def _load_persisted_table(self) -> None:
        """Answer from the table persisted by an earlier run, built by a child process."""
        path = str(self.table_path)
        if not await asyncio.to_thread(os.path.exists, path):
            return
        log.info("answering from the persisted name table until the control plane speaks")
        try:
            await self.dns.update_from_file(path, lambda: asyncio.to_thread(read_name_table, path))
        except NameTableError as exc:
            log.warning("ignoring the persisted name table: %s", exc)

    def _report_health(self, event: Health) -> None:
        """The probe's transitions (the checker calls only on a change): logged, then sent."""
        if event.healthy:
            log.info("health: healthy (readiness probe passes)")
        else:
            log.warning("health: unhealthy: %s", event.message)
        self.xds.report_health(event)

    async def _log_readiness(self) -> None:
        """Log readiness transitions (ready <-> not ready, and changed reasons)."""
        tracker = ReadinessLog()
        while True:
            message = tracker.observe(self.not_ready())
            if message is not None:
                log.info("%s", message)
            await asyncio.sleep(READINESS_POLL_SECONDS)

    def _log_startup(self) -> None:
        """One line per onboarding file, the addresses and the credential source (the DNS
        proxy logs its listen addresses and upstreams itself)."""
        config = self.config
        for found in config.files:
            log.info("config: %s", found.describe())
        sources = config.sources
        log.info("CA: %s (from %s)", config.ca_address, sources.get("CA_ADDR", "default"))
        log.info(
            "control plane (xDS): %s (from %s)",
            config.proxy_config.discovery_address,
            sources.get("discoveryAddress", "default"),
        )
        log.info(
            "credential source: CREDENTIAL_FETCHER_TYPE=%s (from %s), token file %s",
            config.credential_fetcher_type,
            sources.get("CREDENTIAL_FETCHER_TYPE", "default"),
            config.vmagent_token_file,
        )

    # --- lifecycle ---

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set. Raises OSError when a listen address is taken, and the
        supervisor's ConfigError when a part finds a permanent misconfiguration."""
        os.makedirs(self.config.vmagent_state_dir, mode=0o755, exist_ok=True)
        self.capture.prepare()  # before any socket: the exempt gid
        try:
            try:
                await self.dns.start()
            except OSError as exc:  # name what moves it, as the status endpoint's error does
                hint = self.config.listen_hint("DNS_PROXY_ADDR", "HOST:PORT[,HOST:PORT]")
                raise OSError(exc.errno, f"{exc.strerror or exc}; {hint}") from None
            self._log_startup()
            await self.capture.start()  # DNS listens (the watchdog's probe); Envoy not yet
            await self._listen_status()
            if self.dataplane is not None:
                await self.dataplane.start()
        except BaseException:
            await self.capture.stop()
            await self._close_status()
            await self.dns.close()
            raise
        await self._load_persisted_table()  # DNS is serving meanwhile
        parts: dict[str, Part] = {
            "identity": self._run_identity,
            "xds": self.xds.run,
            "dns": self.dns.watch_resolv_conf,
        }
        if self.health is not None:
            parts["health"] = self.health.run
        if self.dataplane is not None:
            parts["envoy"] = self.dataplane.run
        supervised = asyncio.ensure_future(self.supervisor.run(parts))
        readiness = asyncio.ensure_future(self._log_readiness())
        notifying = asyncio.ensure_future(self.notify.run(self.not_ready))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([supervised, stopping], return_when=asyncio.FIRST_COMPLETED)
            if supervised.done():
                supervised.result()  # a permanent error stopped the parts: raise it
            if self.final_health is not None:
                self.notify.stopping()
                log.info("stopping: reporting unhealthy, then closing the control-plane stream")
            await self.xds.close(self.final_health)
            if self.dataplane is not None:  # before the upstream stream closes
                await (
                    self.dataplane.kill() if self.final_health is None else self.dataplane.drain()
                )
        finally:
            for task in (supervised, readiness, notifying, stopping):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.dataplane is not None:
                await self.dataplane.close()
            await self.capture.stop()  # before DNS closes: no redirect to a dead port
            await self._close_status()
            await self.dns.close()

    async def _close_status(self) -> None:
        """Close the status endpoints and remove the Unix socket this agent made (only one it
        listened on: one another agent serves is left alone; a crash leaves it, and the next
        start replaces it as stale)."""
        await self.status.close()
        if self._status_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._status_socket)
            self._status_socket = None

    async def _listen_status(self) -> None:
        """Both status endpoints. A TCP address that cannot be bound is fatal (like the DNS
        port): a health checker must never get its answer from another process. So is a Unix
        socket another live process serves; an unusable run directory is only a warning."""
        address = self.config.vmagent_status_addr
        host, port = split_host_port(address, None)
        try:
            await self.status.listen_tcp(host, port or 15020)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot listen on VMAGENT_STATUS_ADDR={address}: {exc.strerror or exc};"
                " stop the process that holds it or set VMAGENT_STATUS_ADDR to a free address",
            ) from None
        run_dir = self.config.vmagent_run_dir
        try:
            os.makedirs(run_dir, mode=0o755, exist_ok=True)
            await self.status.listen_unix(os.path.join(run_dir, "status.sock"))
            self._status_socket = os.path.join(run_dir, "status.sock")
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise
            log.warning("status socket in %s unavailable: %s", run_dir, exc)

    # --- state ---

    def _envoy_admin(self) -> EnvoyAdmin | None:
        """Envoy's admin client while Envoy is LIVE (for /stats/prometheus), else None."""
        envoy = self.dataplane.envoy if self.dataplane is not None else None
        return envoy.admin if envoy is not None and envoy.live else None

    def not_ready(self) -> list[str]:
        reasons = []
        bundle = self.identity.current if self.identity else None
        if bundle is None or bundle.not_after <= time.time():
            reasons.append("no valid workload certificate")
        if not self.xds.status.connected_once:
            reasons.append("control plane not connected yet")
        if self.dns.not_ready_reason:
            reasons.append(self.dns.not_ready_reason)
        envoy = self.dataplane.not_ready_reason() if self.dataplane else None
        if envoy:
            reasons.append(envoy)
        return reasons

    def state(self) -> dict[str, Any]:
        reasons = self.not_ready()
        return {
            "version": __version__,
            "node": {
                "id": self.node.id,
                "ips": list(self.node.ips),
                "workload_entry": workload_entry_name(
                    str(self.node.metadata.get("AUTO_REGISTER_GROUP") or ""),
                    self.node.ips,
                    self.node.namespace,
                    str(self.node.metadata.get("NETWORK") or ""),
                ),
            },
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
            "envoy": self.dataplane.status() if self.dataplane else None,
            "xds_proxy": self.dataplane.proxy.snapshot() if self.dataplane else None,
            "capture": self.capture.status(),
            "parts": self.supervisor.snapshot(),
            # Counts only: the table itself is /debug/ndsz (rendered off the event loop).
            "name_table": {
                "entries": self.dns.core.counters.table_entries,
                "names": self.dns.core.lookup.size if self.dns.core.lookup else 0,
                "version": self.xds.status.table_version,
            },
        }


def probe_origin(config: Config) -> str:
    """Where the readiness probe came from, for errors: PROXY_CONFIG replaces mesh.yaml's."""
    if "readinessProbe" in parse_proxy_config_env(config.proxy_config_env):
        return "PROXY_CONFIG: readinessProbe"
    mesh = config.vmagent_mesh_config or str(Path(config.vmagent_config_dir) / "mesh.yaml")
    return f"{mesh}: defaultConfig.readinessProbe"


def host_addresses() -> list[str]:
    """The host's addresses, every interface (psutil's getifaddrs(3); no `ip` child: the
    unit's seccomp filter kills iproute2 in some containers). The resolver's view of the
    hostname if that fails."""
    import psutil  # only here: most commands never need it

    try:
        return [
            str(a.address)
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)
        ]
    except OSError:
        with contextlib.suppress(OSError):
            return [str(ai[4][0]) for ai in socket.getaddrinfo(socket.gethostname(), None)]
        return []


def build_agent(config: Config) -> Agent:
    """An agent for ``config`` (NodeError / ProbeSpecError / ConfigError when the config
    cannot work)."""
    return Agent(config, build_node(config, socket.gethostname(), host_addresses()))
