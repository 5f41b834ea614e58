"""The ADS stream to the control plane: TLS and credentials as for the CA, NameTable pushes
into the DNS proxy, health reports, reconnects with backoff (at once after a long-lived
stream ends: istiod recycles streams and the WorkloadEntry must outlive its 10 s grace)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from vmagent.config import Config
from vmagent.dns.table import NameInfo
from vmagent.health import HealthEvent as Health
from vmagent.identity.ca_client import (
    DEFAULT_SERVER_NAME,
    CaTarget,
    open_channel,
    request_metadata,
)
from vmagent.xds.node import NodeInfo
from vmagent.xds.session import (
    AdsSession,
    TablePush,
    backoff_delay,
    health_request,
    node_message,
)

log = logging.getLogger("vmagent.xds")
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

HEALTH_REPEAT_SECONDS = 30.0  # re-send the last health state (istiod may have missed one)
STABLE_STREAM_SECONDS = 5.0  # a stream that lived this long is reopened at once when it ends
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class ChannelAuth:
    """What a connection presents: the workload cert (key PEM, chain PEM) and a bearer token."""

    client_cert: tuple[bytes, bytes] | None = None
    token: str | None = None


AuthSource = Callable[[], Awaitable[ChannelAuth]]
TableSink = Callable[[Mapping[str, NameInfo]], Awaitable[None]]


def xds_target(config: Config) -> CaTarget:
    """Istio's rules for the discovery address: plaintext only on :15010, server name from
    ISTIOD_SAN (a localhost host means istiod's name), root XDS_ROOT_CA else the config dir's."""
    address = config.proxy_config.discovery_address
    host = address[1 : address.find("]")] if address.startswith("[") else address.rsplit(":", 1)[0]
    server_name = config.istiod_san or (DEFAULT_SERVER_NAME if "localhost" in host else host)
    root = config.xds_root_ca or str(Path(config.vmagent_config_dir) / "root-cert.pem")
    return CaTarget(address, server_name, address.endswith(":15010"), root)


@dataclass
class XdsStatus:
    address: str = ""
    connected: bool = False
    connected_once: bool = False
    connected_since: float | None = None
    streams: int = 0
    last_error: str | None = None
    table_version: str | None = None
    table_updates: int = 0
    nacks: int = 0
    last_nack: str | None = None
    health: Health | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "connected": self.connected,
            "connected_once": self.connected_once,
            "connected_since": self.connected_since,
            "streams": self.streams,
            "last_error": self.last_error,
            "name_table_version": self.table_version,
            "name_table_updates": self.table_updates,
            "nacks": self.nacks,
            "last_nack": self.last_nack,
            "health": None
            if self.health is None
            else {"healthy": self.health.healthy, "message": self.health.message},
        }


class XdsClient:
    def __init__(
        self,
        config: Config,
        node: NodeInfo,
        auth: AuthSource,
        on_table: TableSink,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.target = xds_target(config)
        self.status = XdsStatus(address=self.target.address)
        self._auth = auth
        self._on_table = on_table
        self._rng = rng or random.Random()
        self._cluster_id = config.istio_meta_cluster_id
        self._headers = tuple(
            sorted(
                (k[len("XDS_HEADER_") :].lower(), v)
                for k, v in config.dynamic.items()
                if k.startswith("XDS_HEADER_") and len(k) > len("XDS_HEADER_")
            )
        )
        self._outbox: asyncio.Queue[DiscoveryRequest] | None = None

    def report_health(self, health: Health) -> None:
        """Send a health transition now if connected; it is also re-sent on every new stream
        and every HEALTH_REPEAT_SECONDS."""
        self.status.health = health
        if self._outbox is not None:
            self._outbox.put_nowait(health_request(health))

    async def run(self) -> None:
        failures = 0
        while True:
            opened = time.monotonic()
            try:
                await self._stream()
                self.status.last_error = "stream closed by the control plane"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self.status.last_error = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # credentials, TLS files, bugs: report and retry
                self.status.last_error = f"{type(exc).__name__}: {exc}"
            was_connected = self.status.connected
            self.status.connected = False
            self._outbox = None
            if was_connected and time.monotonic() - opened >= STABLE_STREAM_SECONDS:
                failures, delay = 0, 0.0
            else:
                failures += 1
                delay = backoff_delay(failures, self._rng.random())
            log.warning(
                "xds: stream to %s ended (%s); reconnecting in %.1fs",
                self.target.address,
                self.status.last_error,
                delay,
            )
            await asyncio.sleep(delay)

    async def _stream(self) -> None:
        auth = await self._auth()
        metadata = request_metadata(self._cluster_id, auth.token, self._headers)
        async with open_channel(self.target, auth.client_cert) as channel:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT)
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(metadata=metadata)
            session = AdsSession(node_message(self.node))
            outbox: asyncio.Queue[DiscoveryRequest] = asyncio.Queue()
            for request in session.opening(self.status.health):
                outbox.put_nowait(request)
            self._outbox = outbox
            writer = asyncio.ensure_future(self._write(call, outbox))
            try:
                await self._read(call, session, outbox)
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
                call.cancel()

    async def _write(self, call: Any, outbox: asyncio.Queue[DiscoveryRequest]) -> None:
        while True:
            try:
                request = await asyncio.wait_for(outbox.get(), HEALTH_REPEAT_SECONDS)
            except asyncio.TimeoutError:
                if self.status.health is None:
                    continue
                request = health_request(self.status.health)
            await call.write(request)

    async def _read(
        self, call: Any, session: AdsSession, outbox: asyncio.Queue[DiscoveryRequest]
    ) -> None:
        first = True
        while True:
            response = await call.read()
            if response is EOF:
                return
            if first:
                first = False
                self.status.connected = self.status.connected_once = True
                self.status.connected_since = time.time()
                self.status.streams += 1
                self.status.last_error = None
                log.info("xds: connected to %s as %s", self.target.address, self.node.id)
            result = session.on_response(response)
            if isinstance(result, TablePush):
                if result.table is not None:
                    await self._on_table(result.table)
                    self.status.table_version = result.version
                    self.status.table_updates += 1
                elif result.error is not None:
                    self.status.nacks += 1
                    self.status.last_nack = result.error
                    log.error("xds: rejected name table %s: %s", result.version, result.error)
                outbox.put_nowait(result.reply)
            elif result is not None:
                outbox.put_nowait(result)

    async def close(self, final: Health | None = None) -> None:
        """Report ``final`` (e.g. unhealthy while stopping) before the stream goes away, so
        traffic drains before the WorkloadEntry does."""
        outbox = self._outbox
        if final is None or outbox is None:
            return
        self.status.health = final
        outbox.put_nowait(health_request(final))
        for _ in range(50):  # bounded: at most ~1 s for the report to go out
            if outbox.empty():
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
