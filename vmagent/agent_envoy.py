"""Envoy's side of ``vmagent run``: SDS, the xDS proxy and the supervised Envoy.

Start order (reference §6, Istio's ``pkg/istio-agent/agent.go``): the agent starts its DNS
proxy, then :meth:`DataPlane.start` checks the Envoy binary and listens with SDS
(``$VMAGENT_RUN_DIR/sds.sock``) and then the xDS proxy (``xds.sock``); :meth:`DataPlane.run`
is one of the agent's parts: it writes the bootstrap and starts Envoy, restarting it after a
crash with backoff (:class:`vmagent.envoy.EnvoySupervisor`). An Envoy crash stays inside that
part: the upstream stream, DNS and health reporting carry on (docs/xds-proxy.md).

Stop (SIGTERM): the agent reports unhealthy, then :meth:`DataPlane.drain` (drain listeners,
``terminationDrainDuration``, SIGTERM, SIGKILL), then the upstream stream closes, then
:meth:`DataPlane.close`. A reload (SIGHUP) uses :meth:`DataPlane.kill` instead: the next
agent starts a fresh Envoy at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from vmagent.config import Config, ConfigError
from vmagent.envoy import EnvoyBinaryError, EnvoyConfigError, EnvoySupervisor, envoy_options
from vmagent.envoy.binary import resolve_binary
from vmagent.health import ProbeResult
from vmagent.identity.certs import CertBundle
from vmagent.identity.sds import SdsServer
from vmagent.xds import NodeInfo, XdsClient, XdsProxy

log = logging.getLogger("vmagent")


class CertRelay:
    """The certificate source SDS serves from (``vmagent.identity.sds.CertSource``). SDS listens
    before the identity part has built its manager, so the agent publishes every bundle here
    (the one found on disk at start, then each rotation)."""

    def __init__(self) -> None:
        self.current: CertBundle | None = None
        self._subscribers: list[Callable[[CertBundle], None]] = []

    def publish(self, bundle: CertBundle) -> None:
        self.current = bundle
        for subscriber in list(self._subscribers):
            subscriber(bundle)

    def subscribe(self, subscriber: Callable[[CertBundle], None]) -> Callable[[], None]:
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(subscriber)

        return unsubscribe


class DataPlane:
    """SDS + xDS proxy + Envoy for one agent. ``client`` is the agent's one upstream stream;
    the proxy attaches itself to it. ConfigError (from the constructor or :meth:`start`) names
    the ProxyConfig key or the binary that cannot work."""

    def __init__(self, config: Config, node: NodeInfo, client: XdsClient) -> None:
        try:
            self.options = envoy_options(config)
        except EnvoyConfigError as exc:
            raise ConfigError(str(exc)) from None
        self.node = node
        self.certs = CertRelay()
        self.proxy = XdsProxy(client)
        self.sds = SdsServer(self.certs, self.options.sds_socket)
        self.envoy: EnvoySupervisor | None = None

    async def start(self) -> None:
        """Check the binary, then listen: SDS, then the xDS proxy. Envoy starts in :meth:`run`.
        On error nothing is left listening."""
        opts = self.options
        try:
            binary = await asyncio.to_thread(
                resolve_binary, opts.env_binary, opts.binary_path, opts.version_check
            )
        except EnvoyBinaryError as exc:
            raise ConfigError(f"{exc}; or set VMAGENT_ENVOY=false to run without Envoy") from None
        self.envoy = EnvoySupervisor(opts, self.node, binary)
        log.info("envoy: %s (version %s)", binary.path, binary.version_text)
        try:
            await self.sds.start()
            await self.proxy.start(opts.xds_socket)
        except BaseException:
            await self.close()
            raise

    async def run(self) -> None:
        """The agent's ``envoy`` part: Envoy under its supervisor until :meth:`drain`."""
        if self.envoy is None:
            raise RuntimeError("DataPlane.start() first")
        await self.envoy.run()

    async def drain(self) -> None:
        """Drain and end Envoy (shutdown); returns once no Envoy runs."""
        if self.envoy is not None:
            await self.envoy.stop()

    async def kill(self) -> None:
        """End Envoy at once, without draining (a reload starts the next one)."""
        if self.envoy is not None:
            await self.envoy.kill()

    async def close(self) -> None:
        """Stop listening (after Envoy is gone and the upstream stream closed)."""
        await self.proxy.stop()
        await self.sds.stop()

    # --- state ---

    def not_ready_reason(self) -> str | None:
        if self.envoy is None:
            return "Envoy not ready: Envoy not started yet"
        reason = self.envoy.not_ready_reason()
        return None if reason is None else f"Envoy not ready: {reason}"

    async def pre_check(self) -> ProbeResult:
        """The health checker's first check each round (reference §4.2: Envoy's readiness is
        checked before the application probe; either failing means unhealthy)."""
        reason = self.not_ready_reason()
        return ProbeResult(False, reason) if reason else ProbeResult.ok()

    def status(self) -> dict[str, Any]:
        """``envoy`` of ``/status``: see EnvoySupervisor.status (None before :meth:`start`)."""
        return self.envoy.status() if self.envoy is not None else {"state": "not started"}
