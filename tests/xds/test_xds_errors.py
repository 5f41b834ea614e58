"""The ADS stream's failures in words: a TLS name mismatch names the expected name and
ISTIOD_SAN, a timeout says how long (before: ``TimeoutError: `` with nothing after it), and a
client certificate the control plane refuses makes the next stream use the platform credential.
vmagent's XdsClient against a real devmesh (CA + ADS over TLS) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from vmagent.config import Config, load_config
from vmagent.devmesh import Authority
from vmagent.devmesh.controlplane import ControlPlaneSettings
from vmagent.devmesh.serve import DevMesh, running_devmesh
from vmagent.devmesh.settings import DevCaSettings
from vmagent.dns.table import NameInfo
from vmagent.identity.csr import build_csr, private_key_pem
from vmagent.xds import ChannelAuth, XdsClient, build_node

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def devmesh(tmp_path: Path) -> AsyncIterator[DevMesh]:
    config_dir = tmp_path / "mesh-config"
    config_dir.mkdir()
    ca = DevCaSettings(
        trust_domain="cluster.local", directory=str(tmp_path / "keys"), listen="127.0.0.1:0"
    )
    settings = ControlPlaneSettings(config_dir=str(config_dir), poll_interval=0.1, debug_listen="")
    async with running_devmesh(ca, settings) as mesh:
        yield mesh


def agent_config(tmp_path: Path, address: str, root: Path, **values: str) -> Config:
    (tmp_path / "cluster.env").write_text("")
    overrides = {
        "PROXY_CONFIG": f"discoveryAddress: {address}",
        "XDS_ROOT_CA": str(root),
        "POD_NAMESPACE": "shop",
        "ISTIO_META_CLUSTER_ID": "Kubernetes",
        "VMAGENT_MESH_CONFIG": "/dev/null",
        **values,
    }
    return load_config({}, overrides=overrides, cluster_env=tmp_path / "cluster.env")


async def run_until(client: XdsClient, done: object, limit: float) -> None:
    task = asyncio.ensure_future(client.run())
    try:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not done():  # type: ignore[operator]
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def client_for(config: Config, auth: ChannelAuth) -> XdsClient:
    async def source() -> ChannelAuth:
        return auth

    async def sink(table: Mapping[str, NameInfo]) -> None:
        pass

    return XdsClient(config, build_node(config, "vm-1", ["10.0.0.7"]), source, sink)


def test_name_mismatch_names_the_expected_name_and_istiod_san(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with devmesh(tmp_path) as mesh:
            config = agent_config(
                tmp_path, mesh.address, mesh.root_cert, ISTIOD_SAN="istiod.elsewhere.svc"
            )
            client = client_for(config, ChannelAuth(None, "token"))
            await run_until(client, lambda: client.status.last_error, 10)
            error = client.status.last_error or ""
            assert "does not name 'istiod.elsewhere.svc'" in error and "ISTIOD_SAN" in error
            assert not client.status.connected_once

    asyncio.run(scenario())


def test_a_silent_server_times_out_with_a_reason(tmp_path: Path) -> None:
    """A port that accepts TCP and never speaks TLS: the reason is "timed out after 5 s"."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    root = tmp_path / "root-cert.pem"

    async def scenario() -> None:
        async with devmesh(tmp_path) as mesh:
            root.write_bytes(mesh.root_cert.read_bytes())
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        client = client_for(agent_config(tmp_path, address, root), ChannelAuth(None, "token"))
        await run_until(client, lambda: client.status.last_error, 12)
        error = client.status.last_error or ""
        assert "timed out after 5 s" in error and address in error

    try:
        asyncio.run(scenario())
    finally:
        silent.close()


def test_refused_client_certificate_falls_back_to_the_platform_credential(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A workload certificate from another mesh's root: the control plane ends the handshake;
    the agent says so and the next stream connects with the bearer token alone."""
    from cryptography.hazmat.primitives.asymmetric import ec

    other = Authority.load_or_create(tmp_path / "other", "cluster.local", time.time())
    key = ec.generate_private_key(ec.SECP256R1())
    identity = "spiffe://cluster.local/ns/shop/sa/default"
    chain = other.sign_csr(build_csr(key, identity).decode(), identity, 3600, time.time())
    cert = (
        private_key_pem(key),
        "".join(c if c.endswith("\n") else c + "\n" for c in chain).encode(),
    )

    async def scenario() -> None:
        async with devmesh(tmp_path) as mesh:
            config = agent_config(tmp_path, mesh.address, mesh.root_cert)
            told: list[bytes] = []
            client = client_for(config, ChannelAuth(cert, "token", told.append))
            await run_until(client, lambda: client.status.connected, 15)
            assert client.status.connected
            assert told == [cert[1]]  # the identity manager is told, to re-issue

    with caplog.at_level("WARNING", logger="vmagent.xds"):
        asyncio.run(scenario())
    # Never connected: "cannot connect to", not "stream ... ended".
    ended = [r.getMessage() for r in caplog.records if "cannot connect to" in r.getMessage()]
    assert ended and "refused the workload certificate" in ended[0]
    assert "platform credential" in ended[0]
