"""The development control plane's xDS half, assembled: mesh config from a directory
(polled, reloaded on change, a bad file keeps the old config), the ADS servicer, the
WorkloadEntry grace timer and the debug HTTP server.

It can run its own gRPC server (:meth:`ControlPlane.start` with ``listen``) or add its ADS
service to a server shared with the dev CA (:meth:`ControlPlane.add_to_server`), which is how
``vmagent devmesh serve`` serves both on one port like istiod's 15012.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc

from vmagent._compat import TaskGroup
from vmagent.devmesh.ads import AdsServicer
from vmagent.devmesh.dataplane_model import DataplaneOptions, move_group_ports
from vmagent.devmesh.debug import DebugServer
from vmagent.devmesh.registry import DEFAULT_GRACE
from vmagent.devmesh.server import bind_error
from vmagent.devmesh.services import ConfigFileError, MeshConfig, fingerprint, load_directory
from vmagent.devmesh.state import MeshState

log = logging.getLogger(__name__)

DEFAULT_DEBUG_LISTEN = "127.0.0.1:15014"


@dataclass(frozen=True)
class ControlPlaneSettings:
    config_dir: str
    grace: float = DEFAULT_GRACE  # PILOT_WORKLOAD_ENTRY_GRACE_PERIOD
    poll_interval: float = 0.5
    auto_allocate: bool = True  # PILOT_ENABLE_IP_AUTOALLOCATE
    debug_listen: str = DEFAULT_DEBUG_LISTEN  # "" = no debug server
    dataplane: DataplaneOptions = field(default_factory=DataplaneOptions)  # capture listeners


def split_hostport(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class ControlPlane:
    def __init__(self, settings: ControlPlaneSettings, clock: Callable[[], float] = time.time):
        """Loads the config directory; raises :class:`ConfigFileError` if it is unusable."""
        self.settings = settings
        self.clock = clock
        self.state = MeshState(
            self._load(),
            grace=settings.grace,
            auto_allocate=settings.auto_allocate,
        )
        self._fingerprint = fingerprint(Path(settings.config_dir))
        self._poke = asyncio.Event()
        self.ads = AdsServicer(self.state, clock, on_registry_change=self._poke.set)
        self.ads.dataplane = settings.dataplane
        self.debug = DebugServer(self.state, self.ads)
        self._server: grpc.aio.Server | None = None
        self._runner: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def debug_url(self) -> str:
        host = split_hostport(self.settings.debug_listen)[0] if self.settings.debug_listen else ""
        return f"http://{host}:{self.debug.port}" if self.debug.port else ""

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, server)

    def _load(self) -> MeshConfig:
        """The config directory, with ``vmagent dev --app-port``'s moves applied."""
        config = load_directory(self.settings.config_dir)
        return move_group_ports(config, self.settings.dataplane.port_moves)

    def reload(self) -> bool:
        """Re-read the config directory; on error keep the old config and record the error."""
        try:
            config = self._load()
        except ConfigFileError as exc:
            self.state.config_error = str(exc)
            log.error("mesh config not reloaded, keeping the previous one: %s", exc)
            return False
        deleted, registered, refreshed = self.state.set_config(config, self.clock())
        for entry in refreshed:
            log.info("WorkloadEntry %s/%s ports now %s (its group's template)",
                     entry.namespace, entry.name, dict(entry.ports))  # fmt: skip
        for entry in deleted:
            log.info("WorkloadEntry %s/%s deleted: its group is gone", entry.namespace, entry.name)
        for entry in registered:
            log.info("WorkloadEntry %s/%s registered again: its group is back, its proxy "
                     "connected", entry.namespace, entry.name)  # fmt: skip
        log.info(
            "mesh config reloaded: %d services, %d workload groups",
            len(config.services),
            len(config.groups),
        )
        self.ads.push_all()
        return True

    async def start(
        self, listen: str | None = None, credentials: grpc.ServerCredentials | None = None
    ) -> None:
        """Start the background tasks, the debug server and, with ``listen``, a gRPC server
        of its own (TLS with ``credentials``, else plaintext)."""
        if listen is not None:
            self._server = grpc.aio.server()
            self.add_to_server(self._server)
            if credentials is not None:
                self.port = self._server.add_secure_port(listen, credentials)
            else:
                self.port = self._server.add_insecure_port(listen)
            await self._server.start()
        if self.settings.debug_listen:
            try:
                await self.debug.start(*split_hostport(self.settings.debug_listen))
            except OSError as exc:
                await self.stop()
                raise OSError(
                    bind_error(
                        self.settings.debug_listen, "devmesh debug", "--debug-listen HOST:PORT", exc
                    )
                ) from None
        self._runner = asyncio.create_task(self.run())

    async def stop(self) -> None:
        await self.ads.close()
        if self._server is not None:
            await self._server.stop(0.5)
        await self.debug.stop()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def run(self) -> None:
        """The config poller and the grace-period timer, until cancelled."""
        async with TaskGroup() as group:
            group.create_task(self._poll())
            group.create_task(self._expire())

    async def _poll(self) -> None:
        folder = Path(self.settings.config_dir)
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                current = fingerprint(folder)
            except OSError as exc:
                log.warning("cannot list %s: %s", folder, exc)
                continue
            if current != self._fingerprint:
                self._fingerprint = current
                self.reload()

    async def _expire(self) -> None:
        registry = self.state.registry
        while True:
            deadline = registry.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout)
            self._poke.clear()
            gone = registry.expire(self.clock())
            for entry in gone:
                log.info("WorkloadEntry %s/%s deleted after the grace period", entry.namespace,
                         entry.name)  # fmt: skip
            if gone:
                self.ads.push_all()
