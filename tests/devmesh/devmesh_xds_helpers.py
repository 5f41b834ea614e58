"""Test plumbing for the dev control plane: a running devmesh (CA + ADS over TLS on loopback)
and a hand-written xDS client that speaks as Istio's agent does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from vmagent._proto import nds_pb2
from vmagent.devmesh.controlplane import ControlPlaneSettings
from vmagent.devmesh.serve import DevMesh, running_devmesh
from vmagent.devmesh.settings import DevCaSettings

NAME_TABLE = "type.googleapis.com/istio.networking.nds.v1.NameTable"
HEALTH_INFO = "type.googleapis.com/istio.v1.HealthInformation"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SERVER_NAME = "istiod.istio-system.svc"


def write(folder: Path, name: str, text: str) -> None:
    """Write a config file atomically (the poller never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_text(text)
    tmp.replace(folder / name)


@contextlib.asynccontextmanager
async def devmesh(tmp_path: Path, config_dir: Path, grace: float = 10.0) -> AsyncIterator[DevMesh]:
    ca = DevCaSettings(
        trust_domain="cluster.local", directory=str(tmp_path / "keys"), listen="127.0.0.1:0"
    )
    settings = ControlPlaneSettings(
        config_dir=str(config_dir), grace=grace, poll_interval=0.1, debug_listen="127.0.0.1:0"
    )
    async with running_devmesh(ca, settings) as mesh:
        yield mesh


def node(
    ip: str, name: str, namespace: str, labels: Mapping[str, str] | None = None, **meta: str
) -> base_pb2.Node:
    """A node as Istio's agent sends it: string metadata, LABELS an object, INSTANCE_IPS one
    comma-joined string."""
    metadata = struct_pb2.Struct()
    values: dict[str, Any] = {
        "NAMESPACE": namespace,
        "INSTANCE_IPS": ip,
        "ISTIO_VERSION": "1.24.0",
        "CLUSTER_ID": "Kubernetes",
        "SERVICE_ACCOUNT": "default",
        "DNS_CAPTURE": "true",
        **meta,
    }
    if labels:
        values["LABELS"] = dict(labels)
    metadata.update(values)
    return base_pb2.Node(
        id=f"sidecar~{ip.split(',')[0]}~{name}.{namespace}~{namespace}.svc.cluster.local",
        cluster=f"{name}.{namespace}",
        metadata=metadata,
    )


class XdsClient:
    """One ADS stream; requests are written as Istio's agent writes them."""

    def __init__(self, mesh: DevMesh, node: base_pb2.Node) -> None:
        self.node = node
        root = mesh.root_cert.read_bytes()
        self.channel = grpc.aio.secure_channel(
            mesh.address,
            grpc.ssl_channel_credentials(root),
            options=[("grpc.ssl_target_name_override", SERVER_NAME)],
        )
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.StreamAggregatedResources(metadata=(("clusterid", "Kubernetes"),))
        self.sent_node = False
        # One reader for the stream's life: cancelling a grpc.aio read() cancels the RPC.
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

    async def send(self, request: discovery_pb2.DiscoveryRequest) -> None:
        if not self.sent_node and request.type_url != HEALTH_INFO:
            request.node.CopyFrom(self.node)
            self.sent_node = True
        await self.call.write(request)

    async def recv(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(self.inbox.get(), timeout)
        if isinstance(response, Exception):
            raise response
        assert isinstance(response, discovery_pb2.DiscoveryResponse), response
        return response

    async def no_response(self, wait: float = 0.4) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            response = await asyncio.wait_for(self.inbox.get(), wait)
            raise AssertionError(f"unexpected response {response}")

    async def subscribe_nds(self) -> tuple[discovery_pb2.DiscoveryResponse, dict[str, Any]]:
        await self.send(discovery_pb2.DiscoveryRequest(type_url=NAME_TABLE))
        return await self.table_push()

    async def table_push(
        self, timeout: float = 5.0
    ) -> tuple[discovery_pb2.DiscoveryResponse, dict[str, Any]]:
        """The next NameTable response, ACKed; returns it and its table as plain dicts."""
        response = await self.recv(timeout)
        assert response.type_url == NAME_TABLE
        assert len(response.resources) == 1
        table = nds_pb2.NameTable()
        assert response.resources[0].Unpack(table)
        await self.ack(response)
        return response, {
            host: {
                "ips": list(info.ips),
                "registry": info.registry,
                "shortname": info.shortname,
                "namespace": info.namespace,
            }
            for host, info in table.table.items()
        }

    async def ack(self, response: discovery_pb2.DiscoveryResponse) -> None:
        await self.send(
            discovery_pb2.DiscoveryRequest(
                type_url=response.type_url,
                version_info=response.version_info,
                response_nonce=response.nonce,
            )
        )

    async def nack(self, response: discovery_pb2.DiscoveryResponse, message: str) -> None:
        await self.send(
            discovery_pb2.DiscoveryRequest(
                type_url=response.type_url,
                response_nonce=response.nonce,
                error_detail=status_pb2.Status(code=13, message=message),
            )
        )

    async def health(self, healthy: bool, message: str = "") -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=HEALTH_INFO)
        if not healthy:
            request.error_detail.CopyFrom(status_pb2.Status(code=13, message=message))
        await self.send(request)

    async def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


@contextlib.asynccontextmanager
async def connected(mesh: DevMesh, node: base_pb2.Node) -> AsyncIterator[XdsClient]:
    client = XdsClient(mesh, node)
    try:
        yield client
    finally:
        await client.close()


def _fetch(url: str, method: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def debug(mesh: DevMesh, path: str, method: str = "GET") -> tuple[int, Any]:
    return await asyncio.to_thread(_fetch, mesh.debug_url + path, method)


async def entries(mesh: DevMesh) -> dict[str, Any]:
    status, body = await debug(mesh, "/debug/registry")
    assert status == 200
    return {e["metadata"]["name"]: e for e in body["workloadEntries"]}


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll an async or plain predicate until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
