"""The ADS stream to the control plane: TLS and credentials as for the CA, NameTable pushes
into the DNS proxy, health reports, reconnects with backoff (at once after a long-lived
stream ends: istiod recycles streams and the WorkloadEntry must outlive its 10 s grace).

One stream per agent, of either kind: state of the world (``StreamAggregatedResources``) or
delta (``DeltaAggregatedResources``; :func:`upstream_kind` picks it from the config). With an
xDS proxy attached (:attr:`XdsClient.relay`), every response but the NameTable goes to the
proxy, and the proxy sends Envoy's requests with :meth:`XdsClient.send`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
)

from vmagent.config import Config
from vmagent.dns.table import NameTableError
from vmagent.health import HealthEvent as Health
from vmagent.identity.ca_client import request_metadata
from vmagent.identity.channel import (
    CLIENT_CERT,
    CLOSED,
    CaError,
    explain,
    open_channel,
)
from vmagent.xds.clienttypes import (
    AuthSource,
    NdsSink,
    Relay,
    Request,
    Response,
    TableSink,
    XdsConnectError,
    XdsStatus,
    xds_target,
)
from vmagent.xds.delta import DeltaAdsSession
from vmagent.xds.node import NodeInfo
from vmagent.xds.proxycore import DELTA, KINDS, SOTW
from vmagent.xds.session import (
    NAME_TABLE_TYPE,
    AdsSession,
    TablePush,
    backoff_delay,
    node_message,
    table_resource,
)

log = logging.getLogger("vmagent.xds")
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

HEALTH_REPEAT_SECONDS = 30.0  # re-send the last health state (istiod may have missed one)
STABLE_STREAM_SECONDS = 5.0  # a stream that lived this long is reopened at once when it ends
CONNECT_TIMEOUT = 5.0


class XdsClient:
    def __init__(
        self,
        config: Config,
        node: NodeInfo,
        auth: AuthSource,
        on_table: TableSink,
        rng: random.Random | None = None,
        kind: str = SOTW,
        on_nds: NdsSink | None = None,
    ) -> None:
        """``kind``: SOTW or DELTA (see :func:`upstream_kind`); a proxy may change it.
        ``on_nds``: given, pushed tables go to it undecoded (it checks and builds them off
        this process, issue 7 §5) instead of being decoded here for ``on_table``."""
        if kind not in KINDS:
            raise ValueError(f"xDS stream kind must be one of {KINDS}, got {kind!r}")
        self.node = node
        self.kind = kind
        self.relay: Relay | None = None
        self.target = xds_target(config)
        self.status = XdsStatus(address=self.target.address, kind=kind)
        self._auth = auth
        self._on_table = on_table
        self._on_nds = on_nds
        self._rng = rng or random.Random()
        self._cluster_id = config.istio_meta_cluster_id
        self._headers = tuple(
            sorted(
                (k[len("XDS_HEADER_") :].lower(), v)
                for k, v in config.dynamic.items()
                if k.startswith("XDS_HEADER_") and len(k) > len("XDS_HEADER_")
            )
        )
        self._outbox: asyncio.Queue[Request] | None = None
        self._session: AdsSession | DeltaAdsSession | None = None
        self._reopen: asyncio.Event | None = None  # set: end this stream, open another now
        self._refused_chain: bytes | None = None  # a client cert chain the server refused

    def report_health(self, health: Health) -> None:
        """Send a health transition now if connected; it is also re-sent on every new stream
        and every HEALTH_REPEAT_SECONDS."""
        self.status.health = health
        if self._outbox is not None and self._session is not None:
            self._outbox.put_nowait(self._session.health_request(health))

    def send(self, request: Request) -> bool:
        """Queue ``request`` on the open stream; False when there is none (or it is of the
        other kind)."""
        if self._outbox is None:
            return False
        delta_stream = isinstance(self._session, DeltaAdsSession)
        if isinstance(request, DeltaDiscoveryRequest) != delta_stream:
            return False  # the stream is of the other kind (it is being reopened)
        self._outbox.put_nowait(request)
        return True

    def reopen(self, kind: str, reason: str) -> None:
        """End the current stream and open one of ``kind`` at once."""
        if kind not in KINDS:
            raise ValueError(f"xDS stream kind must be one of {KINDS}, got {kind!r}")
        log.warning("xds: reopening the stream to %s as %s: %s", self.target.address, kind, reason)
        self.kind = self.status.kind = kind
        if self._reopen is not None:
            self._reopen.set()

    async def run(self) -> None:
        failures = 0
        while True:
            opened = time.monotonic()
            reopen = self._reopen = asyncio.Event()
            try:
                await self._stream(reopen)
                self.status.last_error = "stream closed by the control plane"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                failure = explain(
                    self.target, exc.code(), exc.details() or "", client_cert_sent=False
                )
                self.status.last_error = failure.message
            except (XdsConnectError, CaError) as exc:
                self.status.last_error = str(exc)
            except Exception as exc:  # credentials, TLS files, bugs: report and retry
                self.status.last_error = (
                    f"{type(exc).__name__}: {exc}" if str(exc) else (type(exc).__name__)
                )
            was_connected = self.status.connected
            self.status.connected = False
            if reopen.is_set():
                failures, delay = 0, 0.0
                self.status.last_error = f"reopening as {self.kind}"
            elif was_connected and time.monotonic() - opened >= STABLE_STREAM_SECONDS:
                failures, delay = 0, 0.0
            else:
                failures += 1
                delay = backoff_delay(failures, self._rng.random())
            # A stream that never connected did not "end": say it could not connect.
            log.warning(
                "xds: stream to %s ended: %s; reconnecting in %.1fs"
                if was_connected
                else "xds: cannot connect to %s: %s; retrying in %.1fs",
                self.target.address,
                self.status.last_error,
                delay,
            )
            await asyncio.sleep(delay)

    async def _stream(self, reopen: asyncio.Event) -> None:
        auth = await self._auth()
        client_cert = auth.client_cert
        if client_cert is not None and client_cert[1] == self._refused_chain and auth.token:
            client_cert = None  # refused before: connect with the platform credential
        metadata = request_metadata(self._cluster_id, auth.token, self._headers)
        async with open_channel(self.target, client_cert) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            kind = self.kind
            if kind == DELTA:
                call = stub.DeltaAggregatedResources(metadata=metadata)
            else:
                call = stub.StreamAggregatedResources(metadata=metadata)
            try:
                await self._connected(call, client_cert, auth.refused)
            except BaseException:
                call.cancel()
                raise
            session: AdsSession | DeltaAdsSession
            if kind == DELTA:
                session = DeltaAdsSession(node_message(self.node))
            else:
                session = AdsSession(node_message(self.node))
            outbox: asyncio.Queue[Request] = asyncio.Queue()
            for request in session.opening(self.status.health):
                outbox.put_nowait(request)
            self._outbox, self._session = outbox, session
            if self.relay is not None:  # after the opening: the node goes first
                self.relay.upstream_opened(kind)
            writer = asyncio.ensure_future(self._write(call, outbox, session))
            reader = asyncio.ensure_future(self._read(call, session, outbox))
            waiter = asyncio.ensure_future(reopen.wait())
            try:
                await asyncio.wait((reader, waiter), return_when=asyncio.FIRST_COMPLETED)
                if reader.done():
                    reader.result()
            finally:
                # Before any await: the proxy must not send on a stream that is ending.
                self._outbox = self._session = None
                if self.relay is not None:
                    self.relay.upstream_closed()
                for task in (writer, reader, waiter):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                call.cancel()

    async def _connected(
        self,
        call: Any,
        client_cert: tuple[bytes, bytes] | None,
        refused: Callable[[bytes], None] | None = None,
    ) -> None:
        """Wait for the stream's connection; XdsConnectError saying why it failed (the TLS or
        resolver reason, or "timed out after N s", never an empty reason)."""
        try:
            await asyncio.wait_for(call.wait_for_connection(), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            failure = explain(
                self.target, None, "", client_cert_sent=False, timeout=CONNECT_TIMEOUT
            )
            raise XdsConnectError(failure.message, failure.kind) from None
        except grpc.aio.AioRpcError as exc:
            failure = explain(
                self.target, exc.code(), exc.details() or "", client_cert_sent=bool(client_cert)
            )
            if client_cert is not None and failure.kind in (CLIENT_CERT, CLOSED):
                # Istio's istiod refuses a workload certificate from another root in the
                # handshake; the next attempt uses the platform credential alone.
                self._refused_chain = client_cert[1]
                if refused is not None:
                    refused(client_cert[1])
                raise XdsConnectError(
                    f"{failure.message}; the control plane refused the workload certificate: "
                    "connecting with the platform credential instead",
                    CLIENT_CERT,
                ) from None
            raise XdsConnectError(failure.message, failure.kind) from None

    async def _write(
        self,
        call: Any,
        outbox: asyncio.Queue[Request],
        session: AdsSession | DeltaAdsSession,
    ) -> None:
        while True:
            try:
                request = await asyncio.wait_for(outbox.get(), HEALTH_REPEAT_SECONDS)
            except asyncio.TimeoutError:
                if self.status.health is None:
                    continue
                request = session.health_request(self.status.health)
            await call.write(request)

    async def _read(
        self, call: Any, session: AdsSession | DeltaAdsSession, outbox: asyncio.Queue[Request]
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
            result: TablePush | Request | None
            applied = False
            if response.type_url == NAME_TABLE_TYPE:
                result, applied = await self._table_push(session, response)
            elif self.relay is not None:
                self.relay.upstream_response(response)
                continue
            else:
                result = session.on_response(response)
            if isinstance(result, TablePush):
                if result.table is not None:
                    await self._on_table(result.table)
                    applied = True
                if applied:
                    self.status.table_version = result.version
                    self.status.table_updates += 1
                elif result.error is not None:
                    self.status.nacks += 1
                    self.status.last_nack = result.error
                    log.error("xds: rejected name table %s: %s", result.version, result.error)
                outbox.put_nowait(result.reply)
            elif result is not None:
                outbox.put_nowait(result)

    async def _table_push(
        self, session: AdsSession | DeltaAdsSession, response: Response
    ) -> tuple[TablePush | Request | None, bool]:
        """The reply to a NameTable push, and whether ``on_nds`` swapped its table in."""
        if self._on_nds is None:
            # Decoding a 100k-service table takes seconds: off the event loop (DNS).
            return await asyncio.to_thread(session.on_response, response), False
        resource = table_resource(response)
        if resource is None or resource.type_url != NAME_TABLE_TYPE:
            return session.on_response(response), False  # empty, or NACKed for its type
        try:
            await self._on_nds(resource.value)
        except NameTableError as exc:
            return session.on_checked(response, str(exc)), False
        return session.on_checked(response, None), True

    async def close(self, final: Health | None = None) -> None:
        """Report ``final`` (e.g. unhealthy while stopping) before the stream goes away, so
        traffic drains before the WorkloadEntry does."""
        outbox, session = self._outbox, self._session
        if final is None or outbox is None or session is None:
            return
        self.status.health = final
        outbox.put_nowait(session.health_request(final))
        for _ in range(50):  # bounded: at most ~1 s for the report to go out
            if outbox.empty():
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
