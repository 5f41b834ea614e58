"""A hand-written delta ADS client (``DeltaAggregatedResources``) for devmesh over TLS, and
small decoders for the Envoy resources devmesh serves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from vmagent.devmesh.serve import DevMesh

from .devmesh_xds_helpers import HEALTH_INFO, SERVER_NAME

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


class DeltaClient:
    """One delta ADS stream; the node goes on the first request only (as Envoy sends it)."""

    def __init__(self, mesh: DevMesh, node: base_pb2.Node) -> None:
        self.node = node
        self.channel = grpc.aio.secure_channel(
            mesh.address,
            grpc.ssl_channel_credentials(mesh.root_cert.read_bytes()),
            options=[("grpc.ssl_target_name_override", SERVER_NAME)],
        )
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.DeltaAggregatedResources(metadata=(("clusterid", "Kubernetes"),))
        self.sent_node = False
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                    return
                self.inbox.put_nowait(response)
        except Exception as exc:
            self.inbox.put_nowait(exc)

    async def send(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        if not self.sent_node and request.type_url != HEALTH_INFO:
            request.node.CopyFrom(self.node)
            self.sent_node = True
        await self.call.write(request)

    async def subscribe(self, type_url: str, names: Sequence[str] = (), nonce: str = "") -> None:
        await self.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, resource_names_subscribe=list(names), response_nonce=nonce
            )
        )

    async def recv(self, timeout: float = 5.0) -> discovery_pb2.DeltaDiscoveryResponse:
        response = await asyncio.wait_for(self.inbox.get(), timeout)
        if isinstance(response, Exception):
            raise response
        assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse), response
        return response

    async def recv_type(self, type_url: str) -> discovery_pb2.DeltaDiscoveryResponse:
        response = await self.recv()
        assert response.type_url == type_url, (response.type_url, type_url)
        return response

    async def no_response(self, wait: float = 0.5) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            response = await asyncio.wait_for(self.inbox.get(), wait)
            raise AssertionError(f"unexpected response {response}")

    async def ack(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        await self.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=response.type_url, response_nonce=response.nonce
            )
        )

    async def nack(self, response: discovery_pb2.DeltaDiscoveryResponse, message: str) -> None:
        await self.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=response.type_url,
                response_nonce=response.nonce,
                error_detail=status_pb2.Status(code=13, message=message),
            )
        )

    async def health(self, healthy: bool, message: str = "") -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(type_url=HEALTH_INFO)
        if not healthy:
            request.error_detail.CopyFrom(status_pb2.Status(code=13, message=message))
        await self.send(request)

    async def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


@contextlib.asynccontextmanager
async def delta_connected(mesh: DevMesh, node: base_pb2.Node) -> AsyncIterator[DeltaClient]:
    client = DeltaClient(mesh, node)
    try:
        yield client
    finally:
        await client.close()


def names(response: Any) -> set[str]:
    """Resource names in a delta (``Resource.name``) or SotW (decoded) response."""
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return {r.name for r in response.resources}
    return set(decode(response))


def decode(response: Any) -> dict[str, Any]:
    """name -> message of every resource in a delta or SotW response."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    kinds = {
        LDS: listener_pb2.Listener,
        CDS: cluster_pb2.Cluster,
        EDS: endpoint_pb2.ClusterLoadAssignment,
        RDS: route_pb2.RouteConfiguration,
    }
    packed = (
        [r.resource for r in response.resources]
        if isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
        else list(response.resources)
    )
    out = {}
    for item in packed:
        message = kinds[response.type_url]()
        assert item.Unpack(message)
        key = message.cluster_name if response.type_url == EDS else message.name
        out[key] = message
    return out


def endpoint_addresses(assignment: Any) -> list[tuple[str, int]]:
    return [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for group in assignment.endpoints
        for e in group.lb_endpoints
    ]
