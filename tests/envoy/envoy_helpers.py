"""Test plumbing for the Envoy component: a config and options on free loopback ports, and a
small ADS server on a Unix socket (SotW and delta) standing in for the agent's xDS proxy: it
records the node Envoy presents and serves CDS (one static cluster to a test backend) and LDS
(one INBOUND tcp_proxy listener), enough for Envoy to become LIVE."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc.aio
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, duration_pb2
from loopback import free_port

from vmagent.config import Config, load_config
from vmagent.envoy.options import EnvoyOptions, envoy_options
from vmagent.xds.node import NodeInfo, build_node

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
INBOUND_LISTENER = "inbound-test"
BACKEND_CLUSTER = "backend"


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (pytest's tmp_path can pass the 108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="ev", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_config(folder: Path, **env: str) -> Config:
    """A Config read the way ``vmagent run`` reads it, from ``env`` only (no /etc files)."""
    cluster_env = folder / "cluster.env"
    cluster_env.write_text("")
    environ = {"VMAGENT_CONFIG_DIR": str(folder), "VMAGENT_RUN_DIR": str(folder), **env}
    return load_config(environ, cluster_env=cluster_env)


def make_node(config: Config, ips: tuple[str, ...] = ("10.0.0.5",)) -> NodeInfo:
    return build_node(config, "vm-1", list(ips))


def loopback_options(config: Config, **overrides: Any) -> EnvoyOptions:
    """The config's options with every port free on loopback and listeners on 127.0.0.1, so
    tests never collide with each other nor listen beyond loopback."""
    return dataclasses.replace(
        envoy_options(config),
        admin_port=free_port(),
        readiness_port=free_port(),
        prometheus_port=free_port(),
        listen_address="127.0.0.1",
        **overrides,
    )


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def backend_cluster(port: int) -> cluster_pb2.Cluster:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=address)
    )
    return cluster_pb2.Cluster(
        name=BACKEND_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=BACKEND_CLUSTER,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )


def inbound_listener(port: int) -> listener_pb2.Listener:
    """An INBOUND listener (what ``drain_listeners?inboundonly`` drains) proxying to backend."""
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix="inbound", cluster=BACKEND_CLUSTER)
    return listener_pb2.Listener(
        name=INBOUND_LISTENER,
        traffic_direction=base_pb2.INBOUND,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.tcp_proxy", typed_config=_pack(proxy)
                    )
                ]
            )
        ],
    )


class FakeAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Answers each stream's first request per type (later ones are ACKs) with the full set."""

    def __init__(self, inbound_port: int, backend_port: int) -> None:
        self.inbound_port = inbound_port
        self.backend_port = backend_port
        self.nodes: list[base_pb2.Node] = []
        self.kinds: list[str] = []
        self._nonces = itertools.count(1)

    def resources(self, type_url: str) -> list[tuple[str, Any]]:
        if type_url == CDS:
            return [(BACKEND_CLUSTER, backend_cluster(self.backend_port))]
        if type_url == LDS:
            return [(INBOUND_LISTENER, inbound_listener(self.inbound_port))]
        return []

    async def StreamAggregatedResources(self, requests: Any, context: Any) -> Any:
        self.kinds.append("sotw")
        async for request in requests:
            if request.node.id:
                self.nodes.append(request.node)
            if request.response_nonce:
                continue
            yield discovery_pb2.DiscoveryResponse(
                type_url=request.type_url,
                version_info="1",
                nonce=str(next(self._nonces)),
                resources=[_pack(r) for _, r in self.resources(request.type_url)],
            )

    async def DeltaAggregatedResources(self, requests: Any, context: Any) -> Any:
        self.kinds.append("delta")
        async for request in requests:
            if request.node.id:
                self.nodes.append(request.node)
            if request.response_nonce:
                continue
            yield discovery_pb2.DeltaDiscoveryResponse(
                type_url=request.type_url,
                system_version_info="1",
                nonce=str(next(self._nonces)),
                resources=[
                    discovery_pb2.Resource(name=name, version="1", resource=_pack(r))
                    for name, r in self.resources(request.type_url)
                ],
            )


@contextlib.asynccontextmanager
async def serving_ads(socket_path: str, ads: FakeAds) -> AsyncIterator[FakeAds]:
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    try:
        yield ads
    finally:
        await server.stop(0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


@contextlib.asynccontextmanager
async def holding_backend() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A TCP server on loopback that keeps every connection open until the test closes it."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until the peer closes
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, writers
    finally:
        for writer in writers:
            writer.close()
        server.close()


async def until(predicate: Any, timeout: float, step: float = 0.1) -> None:
    """Poll ``predicate()`` (sync or async) until true; AssertionError after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)
