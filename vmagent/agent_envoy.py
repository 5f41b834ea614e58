"""Envoy's side of ``vmagent run``: SDS, the xDS proxy and the supervised Envoy.

Start order (reference §6, Istio's ``pkg/istio-agent/agent.go``): the agent starts its DNS
proxy, then :meth:`DataPlane.start` checks the Envoy binary and listens with SDS
(``$VMAGENT_RUN_DIR/sds.sock``) and then the xDS proxy (``xds.sock``); :meth:`DataPlane.run`
is one of the agent's parts: it writes the bootstrap and starts Envoy, restarting it after a
crash with backoff (:class:`vmagent.envoy.EnvoySupervisor`). An Envoy crash stays inside that
part: the upstream stream, DNS and health reporting carry on (docs/xds-proxy.md).

Stop (SIGTERM): the agent reports unhealthy, then :meth:`DataPlane.drain` (drain listeners,
``terminationDrainDuration``, :meth:`DataPlane.close`, SIGTERM, SIGKILL), then the upstream
stream closes. ``close`` before Envoy's SIGTERM ends the SDS and xDS streams with status OK
(Envoy logs that at debug level); left open, Envoy's own shutdown cuts them and warns
``StreamSecrets gRPC config stream to sds-grpc closed: 13, ...`` for each. A reload (SIGHUP)
uses :meth:`DataPlane.kill` instead: the next agent starts a fresh Envoy at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from vmagent.config import Config, ConfigError
from vmagent.envoy import EnvoyBinaryError, EnvoyConfigError, EnvoySupervisor, envoy_options
from vmagent.envoy.binary import resolve_binary
from vmagent.envoy.bootstrap import loopback, wildcard
from vmagent.envoy.options import EnvoyOptions
from vmagent.envoy.ports import listen_blocked
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
        self.config = config
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
        check_envoy_ports(self.config, opts, self.node.ips)
        self.envoy = EnvoySupervisor(opts, self.node, binary)
        # End SDS/xDS streams after the drain, before SIGTERM: quiet in Envoy's log.
        self.envoy.before_terminate = self.close
        log.info("envoy: %s (version %s)", binary.path, binary.version_text)
        try:
            await self.sds.start()
            await self.proxy.start(opts.xds_socket)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, (OSError, RuntimeError)):  # grpc: "Failed to bind to address"
                raise OSError(
                    getattr(exc, "errno", None),
                    f"cannot listen on the SDS/xDS sockets in {opts.sds_socket.rpartition('/')[0]}"
                    f": {exc}; set VMAGENT_RUN_DIR to a directory this agent can use",
                ) from None
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
        """Stop listening (after Envoy is gone and the upstream stream closed), and remove the
        SDS socket and the bootstrap this agent wrote: a clean stop leaves no files in
        VMAGENT_RUN_DIR (the xDS proxy removes its own socket). Idempotent."""
        await self.proxy.stop()
        await self.sds.stop()
        for path in (self.options.sds_socket, self.options.bootstrap_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # the next start (a SIGHUP reload) writes them again

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


def check_envoy_ports(config: Config, opts: EnvoyOptions, node_ips: Sequence[str]) -> None:
    """Envoy only logs a port it cannot bind (and never gets ready, restarted forever): bind
    each of its agent ports first, as Envoy will (SO_REUSEADDR: only a live listener counts).
    Raises OSError naming the port's setting."""
    listen = opts.listen_address or wildcard(node_ips)
    wanted = [
        (loopback(node_ips), opts.admin_port, "Envoy admin", "ProxyConfig proxyAdminPort"),
        (listen, opts.readiness_port, "Envoy readiness", "VMAGENT_ENVOY_READINESS_PORT"),
        (listen, opts.prometheus_port, "Envoy Prometheus", "VMAGENT_ENVOY_PROMETHEUS_PORT"),
    ]
    for host, port, what, key in wanted:
        exc = listen_blocked(host, port)
        if exc is not None:
            hint = (
                f"stop the process that holds it or set {key} (mesh.yaml or PROXY_CONFIG)"
                if key.startswith("ProxyConfig")
                else config.listen_hint(key, "PORT")
            )
            raise OSError(
                exc.errno, f"cannot listen on {host} port {port} ({what}): {exc.strerror}; {hint}"
            )
