"""The agent's xDS proxy: Envoy's ADS on a Unix socket, carried on the agent's one upstream
stream (:class:`vmagent.xds.client.XdsClient`). The decisions are ``proxycore``'s; this shell
moves messages.

Use (``vmagent run``)::

    client = XdsClient(config, node, auth, on_table, kind=upstream_kind(config))
    proxy = XdsProxy(client)                       # attaches itself to the client
    await proxy.start(xds_socket_path(config))     # listening; start Envoy after this
    ... client.run() in the same TaskGroup ...
    await proxy.stop()

Socket (reference §5, Istio's ``pkg/istio-agent/xds_proxy.go``): stale file removed, directory
0750, socket 0660 (Envoy runs as the agent's user; Istio's 0666 is wider than needed); gRPC
keepalive 30 s / 10 s; no message size limit. One downstream stream at a time: a new one
replaces the old one (closed with UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc

from vmagent.config import Config
from vmagent.xds.client import XdsClient
from vmagent.xds.proxycore import (
    DELTA,
    SOTW,
    CloseDownstream,
    Decision,
    Note,
    ProxyCore,
    ReopenUpstream,
    Request,
    Response,
    ToDownstream,
    ToUpstream,
)

log = logging.getLogger("vmagent.xds.proxy")

SOCKET_NAME = "xds.sock"  # vmagent.envoy.options.XDS_SOCKET_NAME
SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)


def xds_socket_path(config: Config) -> Path:
    return Path(config.vmagent_run_dir) / SOCKET_NAME


class _End:
    """Queue item: end the downstream stream (``reason`` None: it ended by itself)."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason


class XdsProxy(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, upstream: XdsClient) -> None:
        self.upstream = upstream
        self.core = ProxyCore(upstream.kind)
        self.path: Path | None = None
        self._queues: dict[int, asyncio.Queue[Response | _End]] = {}
        self._ids = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        upstream.relay = self

    # -- relay (called by the client) -------------------------------------------------
    def upstream_opened(self, kind: str) -> None:
        self._apply(self.core.upstream_opened(kind))

    def upstream_closed(self) -> None:
        self._apply(self.core.upstream_closed())

    def upstream_response(self, response: Response) -> None:
        self._apply(self.core.upstream_response(response))

    # -- server -----------------------------------------------------------------------
    async def start(self, path: str | Path) -> None:
        """Listen on ``path``; returns once Envoy can connect."""
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = grpc.aio.server(options=SERVER_OPTIONS)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        server.add_insecure_port(f"unix:{self.path}")
        await server.start()
        self._server = server
        os.chmod(self.path, 0o660)
        log.info("xds proxy listening on %s (upstream %s)", self.path, self.core.kind)

    async def serve(self, path: str | Path) -> None:
        """Listen on ``path`` until cancelled (for a TaskGroup)."""
        await self.start(path)
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # Stop taking streams, then end Envoy's with status OK: Envoy logs that at debug
            # level, a stream cut by a closing connection as a warning.
            stopping = asyncio.ensure_future(server.stop(0.5))
            await asyncio.sleep(0)
            for queue in list(self._queues.values()):
                queue.put_nowait(_End(None))
            await stopping
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def snapshot(self) -> dict[str, object]:
        return self.core.snapshot()

    # -- gRPC handlers ----------------------------------------------------------------
    async def StreamAggregatedResources(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        # grpc.aio wants an async generator function here, not one returning a generator.
        async for response in self._serve_stream(SOTW, requests, context):
            yield response

    async def DeltaAggregatedResources(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        # grpc.aio wants an async generator function here, not one returning a generator.
        async for response in self._serve_stream(DELTA, requests, context):
            yield response

    async def _serve_stream(
        self, kind: str, requests: AsyncIterator[Request], context: Any
    ) -> AsyncIterator[Response]:
        stream = next(self._ids)
        queue: asyncio.Queue[Response | _End] = asyncio.Queue()
        self._queues[stream] = queue
        log.info("xds proxy: Envoy stream %d opened (%s)", stream, kind)
        self._apply(self.core.downstream_opened(stream, kind))

        async def read() -> None:
            try:
                async for request in requests:
                    self._apply(self.core.downstream_request(stream, request))
            finally:
                queue.put_nowait(_End(None))

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    if item.reason is not None:
                        log.info("xds proxy: closing Envoy stream %d: %s", stream, item.reason)
                        await context.abort(grpc.StatusCode.UNAVAILABLE, item.reason)
                    return
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            del self._queues[stream]
            self._apply(self.core.downstream_closed(stream))
            log.info("xds proxy: Envoy stream %d closed", stream)

    def _apply(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            if isinstance(decision, ToUpstream):
                if not self.upstream.send(decision.request):
                    log.debug("xds proxy: no upstream stream for %s", decision.request.type_url)
            elif isinstance(decision, ToDownstream):
                queue = self._queues.get(decision.stream)
                if queue is not None:
                    queue.put_nowait(decision.response)
            elif isinstance(decision, CloseDownstream):
                queue = self._queues.get(decision.stream)
                if queue is not None:
                    queue.put_nowait(_End(decision.reason))
            elif isinstance(decision, ReopenUpstream):
                self.upstream.reopen(decision.kind, decision.reason)
            elif isinstance(decision, Note):
                log.log(decision.level, "%s", decision.text)
