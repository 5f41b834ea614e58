"""``envoy.service.discovery.v3.AggregatedDiscoveryService`` (state of the world) over
grpc.aio: the thin shell around :class:`~vmagent.devmesh.session.Session` and
:class:`~vmagent.devmesh.state.MeshState`.

Like istiod: the first request must carry the node (a HealthInformation request before it is
ignored); an unusable node is ``INVALID_ARGUMENT``; auto-registration failures end the stream
with istiod's status (``FAILED_PRECONDITION`` for a missing WorkloadGroup). NameTable requests
get one unnamed Any-packed NameTable; other types get an empty response. Pushes happen when
:meth:`AdsServicer.push_all` is called (config or registry changed) and the proxy's table
actually changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from vmagent._proto import nds_pb2
from vmagent.devmesh.node import NodeError, parse_node
from vmagent.devmesh.registry import RegistrationError
from vmagent.devmesh.session import (
    HEALTH_INFO,
    NAME_TABLE,
    Ack,
    Health,
    Nack,
    Respond,
    Session,
    Stale,
)
from vmagent.devmesh.state import MeshState, pack_table

log = logging.getLogger(__name__)

MALFORMED_KINDS = ("bytes", "ips")


def malformed_table(kind: str) -> any_pb2.Any:
    """A NameTable resource an agent must NACK: undecodable bytes, or a decodable table whose
    IPs are not IP addresses."""
    if kind == "bytes":
        return any_pb2.Any(type_url=NAME_TABLE, value=b"\x0a\xff\xff\xff\xff\x0f")
    if kind == "ips":
        table = nds_pb2.NameTable()
        info = table.table["malformed.devmesh.invalid"]
        info.ips.extend(["not-an-ip", "300.1.2.3"])
        info.registry = "External"
        return any_pb2.Any(type_url=NAME_TABLE, value=table.SerializeToString())
    raise ValueError(f"unknown malformed kind {kind!r} (expected one of {MALFORMED_KINDS})")


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        state: MeshState,
        clock: Callable[[], float] = time.time,
        on_registry_change: Callable[[], None] | None = None,
    ) -> None:
        self.state = state
        self.clock = clock
        self.on_registry_change = on_registry_change
        self._wake: dict[str, asyncio.Event] = {}
        self._injected: dict[str, list[any_pb2.Any]] = {}
        self._ids = itertools.count(1)
        # Maps a gRPC peer to the caller's verified SPIFFE ID (set when behind the TLS front).
        self.identify: Callable[[str], str | None] | None = None

    def push_all(self) -> None:
        """Have every stream recompute its NameTable and send it if it changed."""
        for event in self._wake.values():
            event.set()

    def registry_changed(self) -> None:
        self.push_all()
        if self.on_registry_change is not None:
            self.on_registry_change()

    def push_malformed(self, proxy: str, kind: str) -> list[str]:
        """Test hook: send a malformed NameTable to matching NDS streams; returns their IDs."""
        resource = malformed_table(kind)
        streams = [s.id for s in self.state.find(proxy) if NAME_TABLE in s.watches]
        for stream in streams:
            self._injected.setdefault(stream, []).append(resource)
            self._wake[stream].set()
        return streams

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        session = Session(str(next(self._ids)), context.peer(), self.clock())
        if self.identify is not None:
            session.identity = self.identify(session.peer)
        wake = asyncio.Event()
        requests = request_iterator.__aiter__()
        reader: asyncio.Future[Any] = asyncio.ensure_future(requests.__anext__())
        waiter: asyncio.Future[Any] = asyncio.ensure_future(wake.wait())
        try:
            while True:
                done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    wake.clear()
                    waiter = asyncio.ensure_future(wake.wait())
                    await self._push(session, context)
                if reader in done:
                    try:
                        request = reader.result()
                    except StopAsyncIteration:
                        break
                    reader = asyncio.ensure_future(requests.__anext__())
                    await self._handle(session, wake, request, context)
        finally:
            for task in (reader, waiter):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(reader, waiter, return_exceptions=True)
            self._close(session)

    def _close(self, session: Session) -> None:
        self._wake.pop(session.id, None)
        self._injected.pop(session.id, None)
        if self.state.sessions.pop(session.id, None) is None:
            return
        log.info("ADS: stream %s of %s closed", session.id, session.node and session.node.id)
        entry = self.state.registry.disconnect(session.id, self.clock())
        if entry is not None:
            log.info("WorkloadEntry %s/%s disconnected", entry.namespace, entry.name)
            self.registry_changed()

    async def _start(
        self,
        session: Session,
        wake: asyncio.Event,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> bool:
        """Accept the first request; False if it was a HealthInformation to ignore."""
        if request.type_url == HEALTH_INFO:
            log.warning("ADS: %s sent a health report before its first xDS request", session.peer)
            return False
        try:
            node = parse_node(request.node if request.HasField("node") else None)
        except NodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises
        try:
            entry = self.state.registry.connect(session.id, node, self.state.config, self.clock())
        except RegistrationError as exc:
            log.warning("ADS: %s: %s", node.id, exc.message)
            await context.abort(grpc.StatusCode[exc.code], exc.message)
            raise  # unreachable
        session.node = node
        self.state.sessions[session.id] = session
        self._wake[session.id] = wake
        log.info("ADS: new stream %s for node %s", session.id, node.id)
        if entry is not None:
            log.info("WorkloadEntry %s/%s connected", entry.namespace, entry.name)
            self.registry_changed()
        return True

    async def _handle(
        self,
        session: Session,
        wake: asyncio.Event,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        if session.node is None and not await self._start(session, wake, request, context):
            return
        now = self.clock()
        decision = session.receive(request, now)
        if isinstance(decision, Respond):
            await self._respond(session, decision.type_url, context)
        elif isinstance(decision, Nack):
            log.warning(
                "ADS: NACK from %s for %s version %s nonce %s: %s",
                session.node and session.node.id,
                decision.type_url,
                decision.version,
                decision.nonce,
                decision.message,
            )
        elif isinstance(decision, Health):
            if self.state.registry.report_health(
                session.id, decision.healthy, decision.message, now
            ):
                self.registry_changed()
        elif isinstance(decision, Stale):
            log.debug("ADS: stale nonce %s for %s", decision.nonce, decision.type_url)
        elif isinstance(decision, Ack):
            log.debug("ADS: ACK %s version %s", decision.type_url, decision.version)

    async def _respond(
        self,
        session: Session,
        type_url: str,
        context: grpc.aio.ServicerContext[Any, Any],
        packed: tuple[any_pb2.Any, bytes] | None = None,
    ) -> None:
        assert session.node is not None
        now = self.clock()
        if type_url == NAME_TABLE:
            resource, payload = packed or pack_table(self.state.name_table(session.node))
            response = session.response(type_url, [resource], now, payload)
        else:
            response = session.response(type_url, [], now, b"")
        await context.write(response)

    async def _push(self, session: Session, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if session.node is None:
            return
        watch = session.watches.get(NAME_TABLE)
        if watch is None:
            return
        for resource in self._injected.pop(session.id, []):
            log.warning("ADS: pushing a malformed NameTable to %s (test hook)", session.node.id)
            # Keep the last good payload: the good table is not re-sent until it changes.
            good = watch.sent_payload
            await context.write(session.response(NAME_TABLE, [resource], self.clock(), good))
        packed = pack_table(self.state.name_table(session.node))
        if packed[1] != watch.sent_payload:
            await self._respond(session, NAME_TABLE, context, packed)
