"""``envoy.service.discovery.v3.AggregatedDiscoveryService`` over grpc.aio, state of the
world (``StreamAggregatedResources``) and delta (``DeltaAggregatedResources``): the thin shell
around :class:`~vmagent.devmesh.session.Session`, :class:`~vmagent.devmesh.delta.DeltaSession`
and :class:`~vmagent.devmesh.state.MeshState`.

Like istiod: the first request must carry the node (a HealthInformation request before it is
ignored); an unusable node is ``INVALID_ARGUMENT``; auto-registration failures end the stream
with istiod's status (``FAILED_PRECONDITION`` for a missing WorkloadGroup). NameTable requests
get one unnamed Any-packed NameTable; LDS/CDS/EDS/RDS get the proxy's data plane
(:mod:`~vmagent.devmesh.dataplane`); other types get an empty response (SotW) or nothing
(delta). Pushes happen when :meth:`AdsServicer.push_all` is called (config or registry
changed), per type, only when what the proxy gets changed; a CDS response is followed by EDS
so Envoy can finish warming its clusters (istiod's full push and ``forceEDSPush``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from vmagent._proto import nds_pb2
from vmagent.devmesh.dataplane import DATAPLANE_TYPES, Resource, select
from vmagent.devmesh.dataplane_model import DataplaneOptions
from vmagent.devmesh.delta import DeltaSession, RespondNames
from vmagent.devmesh.node import NodeError, parse_node
from vmagent.devmesh.registry import RegistrationError
from vmagent.devmesh.session import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    HEALTH_INFO,
    NAME_TABLE,
    Ack,
    Health,
    Nack,
    Respond,
    Session,
    Stale,
)
from vmagent.devmesh.snapshot import Snapshot, proxy_snapshot, served_types
from vmagent.devmesh.state import MeshState

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
        self._closing = False
        # Maps a gRPC peer to the caller's verified SPIFFE ID (set when behind the TLS front).
        self.identify: Callable[[str], str | None] | None = None
        # Where the proxies' capture listeners are (tests and `vmagent dev` change it).
        self.dataplane = DataplaneOptions()

    def push_all(self) -> None:
        """Have every stream recompute its NameTable and send it if it changed."""
        for event in self._wake.values():
            event.set()

    async def close(self, timeout: float = 2.0) -> None:
        """End every stream (OK status, as a server going away does) and wait up to
        ``timeout`` seconds for them to finish, so stopping the gRPC server cancels no
        handler (grpc logs a cancelled servicer as an unhandled exception)."""
        self._closing = True
        self.push_all()
        deadline = asyncio.get_running_loop().time() + timeout
        while self._wake and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

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
        if self._closing:
            return
        session = Session(str(next(self._ids)), context.peer(), self.clock())

        async def handle(request: discovery_pb2.DiscoveryRequest) -> None:
            await self._handle(session, request, context)

        await self._serve(session, request_iterator, handle, lambda: self._push(session, context))

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        if self._closing:
            return
        session = DeltaSession(str(next(self._ids)), context.peer(), self.clock())

        async def handle(request: discovery_pb2.DeltaDiscoveryRequest) -> None:
            await self._handle_delta(session, request, context)

        await self._serve(
            session, request_iterator, handle, lambda: self._push_delta(session, context)
        )

    async def _serve(
        self,
        session: Session,
        request_iterator: AsyncIterator[Any],
        handle: Callable[[Any], Awaitable[None]],
        push: Callable[[], Awaitable[None]],
    ) -> None:
        """One stream: requests and pushes, one at a time, until the client or close() ends it."""
        if self.identify is not None:
            session.identity = self.identify(session.peer)
        wake = asyncio.Event()
        self._wake[session.id] = wake  # before the node arrives too: close() must reach it
        requests = request_iterator.__aiter__()
        reader: asyncio.Future[Any] = asyncio.ensure_future(requests.__anext__())
        waiter: asyncio.Future[Any] = asyncio.ensure_future(wake.wait())
        try:
            while True:
                done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    if self._closing:
                        break
                    wake.clear()
                    waiter = asyncio.ensure_future(wake.wait())
                    if session.node is not None:
                        await push()
                if reader in done:
                    try:
                        request = reader.result()
                    except StopAsyncIteration:
                        break
                    reader = asyncio.ensure_future(requests.__anext__())
                    await handle(request)
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
        request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
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
        kind = "delta" if isinstance(session, DeltaSession) else "SotW"
        log.info("ADS: new %s stream %s for node %s", kind, session.id, node.id)
        if entry is not None:
            log.info("WorkloadEntry %s/%s connected", entry.namespace, entry.name)
            self.registry_changed()
        return True

    def _note(self, session: Session, decision: Any, now: float) -> None:
        """Log NACKs, stale nonces and ACKs; apply health reports (both stream kinds)."""
        if isinstance(decision, Nack):
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

    def _snapshot(self, session: Session, also: str = "") -> Snapshot:
        """The types ``session`` watches, and ``also``."""
        return proxy_snapshot(self.state, session, self.dataplane, {*session.watches, also})

    # --- state of the world ---

    async def _handle(
        self,
        session: Session,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        if session.node is None and not await self._start(session, request, context):
            return
        now = self.clock()
        decision = session.receive(request, now)
        if isinstance(decision, Respond):
            snapshot = self._snapshot(session, decision.type_url)
            await self._respond(session, decision.type_url, context, snapshot)
        else:
            self._note(session, decision, now)

    def _sotw_resources(
        self, session: Session, type_url: str, snapshot: Snapshot
    ) -> tuple[list[any_pb2.Any], bytes]:
        """What a SotW response for ``type_url`` holds, and the bytes pushes compare."""
        if type_url == NAME_TABLE:
            table = snapshot[NAME_TABLE][""]
            return [table.any], table.version.encode()
        if type_url not in DATAPLANE_TYPES:
            return [], b""
        watch = session.watches[type_url]
        chosen = select(snapshot[type_url], type_url, watch.names)
        payload = "\n".join(f"{n}={r.version}" for n, r in sorted(chosen.items())).encode()
        return [r.any for _, r in sorted(chosen.items())], payload

    async def _respond(
        self,
        session: Session,
        type_url: str,
        context: grpc.aio.ServicerContext[Any, Any],
        snapshot: Snapshot,
    ) -> None:
        resources, payload = self._sotw_resources(session, type_url, snapshot)
        await context.write(session.response(type_url, resources, self.clock(), payload))

    async def _push(self, session: Session, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        assert session.node is not None
        watch = session.watches.get(NAME_TABLE)
        for resource in self._injected.pop(session.id, []) if watch else []:
            log.warning("ADS: pushing a malformed NameTable to %s (test hook)", session.node.id)
            # Keep the last good payload: the good table is not re-sent until it changes.
            good = watch.sent_payload if watch else None
            await context.write(session.response(NAME_TABLE, [resource], self.clock(), good))
        snapshot = self._snapshot(session)
        sent_clusters = False
        for type_url in served_types():
            watch = session.watches.get(type_url)
            if watch is None:
                continue
            _, payload = self._sotw_resources(session, type_url, snapshot)
            warming = type_url == ENDPOINT_TYPE and sent_clusters
            if payload != watch.sent_payload or warming:
                await self._respond(session, type_url, context, snapshot)
                sent_clusters = sent_clusters or type_url == CLUSTER_TYPE

    # --- delta ---

    async def _handle_delta(
        self,
        session: DeltaSession,
        request: discovery_pb2.DeltaDiscoveryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        if session.node is None and not await self._start(session, request, context):
            return
        now = self.clock()
        decision = session.receive_delta(request, now)
        if not isinstance(decision, (Respond, RespondNames)):
            self._note(session, decision, now)
            return
        snapshot = self._snapshot(session, decision.type_url)
        current = snapshot.get(decision.type_url, {})
        names = decision.names if isinstance(decision, RespondNames) else None
        response = session.delta_response(decision.type_url, current, now, names=names,
                                          full=names is None)  # fmt: skip
        if response is not None:
            await context.write(response)
        if decision.type_url == CLUSTER_TYPE:
            # istiod's forceEDSPush: EDS after any CDS answer, or clusters may warm forever.
            await self._write_delta(session, context, ENDPOINT_TYPE, snapshot, full=True)

    async def _write_delta(
        self,
        session: DeltaSession,
        context: grpc.aio.ServicerContext[Any, Any],
        type_url: str,
        snapshot: Snapshot,
        full: bool = False,
    ) -> bool:
        response = session.delta_response(type_url, snapshot.get(type_url, {}), self.clock(),
                                          full=full)  # fmt: skip
        if response is None:
            return False
        await context.write(response)
        return True

    async def _push_delta(
        self, session: DeltaSession, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        assert session.node is not None
        for packed in self._injected.pop(session.id, []):
            log.warning("ADS: pushing a malformed NameTable to %s (test hook)", session.node.id)
            watch = session.watch(NAME_TABLE)
            good = watch.known.get("") if watch else None
            bad = {NAME_TABLE: {"": Resource("", "malformed", packed)}}
            await self._write_delta(session, context, NAME_TABLE, bad, full=True)
            if watch is not None and good is not None:
                # As on SotW: the good table is not re-sent until it changes.
                watch.known[""] = good
        snapshot = self._snapshot(session)
        sent_clusters = False
        for type_url in served_types():
            warming = type_url == ENDPOINT_TYPE and sent_clusters
            sent = await self._write_delta(session, context, type_url, snapshot, full=warming)
            sent_clusters = sent_clusters or (sent and type_url == CLUSTER_TYPE)
