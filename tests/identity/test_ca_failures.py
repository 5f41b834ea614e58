"""What the agent sends to the CA, and what happens when the CA or the disk misbehaves."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from vmagent.devmesh import Authority, CaService, DevCa
from vmagent.identity import IdentityError, create_manager
from vmagent.identity.csr import build_csr

from .helpers import agent, agent_values, ca_settings, make_config

pytestmark = pytest.mark.timeout(60)


class FaultyCa(CaService):
    """The dev CA, recording requests, with a scripted misbehaviour per call."""

    def __init__(self, base: CaService, other: Authority) -> None:
        super().__init__(base.authority, base.verifier, base.trust_domain, None, base.clock)
        self.other = other
        self.script: list[str] = []
        self.requests: list[tuple[Any, dict[str, str]]] = []

    async def CreateCertificate(self, request: Any, context: Any) -> Any:
        self.requests.append((request, {k: v for k, v in context.invocation_metadata()}))
        fault = self.script.pop(0) if self.script else "ok"
        if fault in ("UNAVAILABLE", "INTERNAL", "PERMISSION_DENIED"):
            await context.abort(getattr(grpc.StatusCode, fault), f"injected {fault}")
        response = await super().CreateCertificate(request, context)
        if fault == "leaf-only":
            del response.cert_chain[1:]
        elif fault == "other-root":
            response.cert_chain[:] = self.other.sign_csr(
                request.csr, "spiffe://x/ns/a/sa/b", 3600, time.time()
            )
        elif fault == "wrong-key":
            csr = build_csr(ec.generate_private_key(ec.SECP256R1()), "spiffe://x").decode()
            response.cert_chain[:] = self.authority.sign_csr(
                csr, "spiffe://x/ns/a/sa/b", 3600, time.time()
            )
        elif fault == "expired":
            response.cert_chain[:] = self.authority.sign_csr(
                request.csr, "spiffe://x/ns/a/sa/b", 1, time.time() - 600
            )
        return response


async def start_faulty(tmp_path: Path) -> tuple[DevCa, FaultyCa]:
    ca = DevCa(ca_settings(tmp_path))
    other = Authority.load_or_create(tmp_path / "other", "cluster.local", time.time())
    ca.service = FaultyCa(ca.service, other)
    await ca.start()
    (tmp_path / "istio-token").write_text(ca.authority.mint_token("shop", "cart", time.time()))
    return ca, ca.service


def test_request_as_istio_sends_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        ca, service = await start_faulty(tmp_path)
        try:
            config = make_config(
                tmp_path,
                **agent_values(tmp_path, ca, SECRET_TTL="12h", ISTIO_META_CERT_SIGNER="vm-signer"),
            )
            manager = await create_manager(config, {"CA_HEADER_X-Tenant": "blue", "PATH": "/"})
            await manager.renew()
            request, metadata = service.requests[-1]
            assert request.validity_duration == 43200
            assert dict(request.metadata.fields)["CertSigner"].string_value == "vm-signer"
            assert request.csr.startswith("-----BEGIN CERTIFICATE REQUEST-----")
            assert metadata["clusterid"] == "vm-cluster"
            token = (tmp_path / "istio-token").read_text()
            assert metadata["authorization"] == f"Bearer {token}"
            assert metadata["x-tenant"] == "blue"
        finally:
            await ca.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("leaf-only", "need leaf and root"),
        ("other-root", "trusted root"),
        ("wrong-key", "not for our key"),
        ("expired", "expired"),
        ("PERMISSION_DENIED", "PERMISSION_DENIED: injected"),
    ],
)
def test_bad_replies_are_rejected_and_the_old_cert_kept(
    tmp_path: Path, fault: str, message: str
) -> None:
    async def scenario() -> None:
        ca, service = await start_faulty(tmp_path)
        try:
            manager = await agent(tmp_path, ca)
            old = await manager.renew()
            files = (tmp_path / "state" / "certs" / "cert-chain.pem").read_bytes()
            service.script = [fault]
            with pytest.raises(IdentityError, match=message):
                await manager.renew()
            assert manager.current == old
            assert (tmp_path / "state" / "certs" / "cert-chain.pem").read_bytes() == files
            assert manager.state.failures == 1 and message.split(":")[0] in (
                manager.state.last_error
            )
            assert manager.status()["last_error"]
        finally:
            await ca.stop()

    asyncio.run(scenario())


def test_retriable_codes_are_retried(tmp_path: Path) -> None:
    async def scenario() -> None:
        ca, service = await start_faulty(tmp_path)
        try:
            manager = await agent(tmp_path, ca)
            service.script = ["UNAVAILABLE", "INTERNAL"]
            await manager.renew()
            assert len(service.requests) == 3
            service.script = ["UNAVAILABLE"] * 5
            with pytest.raises(IdentityError, match="UNAVAILABLE"):
                await manager.renew()
            assert len(service.requests) == 8  # five attempts, then give up until next round
        finally:
            await ca.stop()

    asyncio.run(scenario())


def test_ca_down_keeps_the_cert_and_recovers(tmp_path: Path) -> None:
    async def scenario() -> None:
        ca, _ = await start_faulty(tmp_path)
        manager = await agent(tmp_path, ca)
        old = await manager.renew()
        await ca.stop()
        with pytest.raises(IdentityError, match="UNAVAILABLE"):
            await manager.renew()
        assert manager.current == old
        retry_at = manager.state.retry_at
        assert retry_at is not None and retry_at < old.not_after

    asyncio.run(scenario())


def test_read_only_state_dir_keeps_serving_the_old_cert(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to remount a tmpfs read-only")
    certs = tmp_path / "state" / "certs"
    certs.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(certs)]).returncode:
        pytest.skip("cannot mount tmpfs")

    async def scenario() -> None:
        ca, _ = await start_faulty(tmp_path)
        try:
            manager = await agent(tmp_path, ca)
            old = await manager.renew()
            subprocess.run(["mount", "-o", "remount,ro", str(certs)], check=True)
            with pytest.raises(
                IdentityError, match=f"cannot write certificates to {certs}: Read-only file system"
            ):
                await manager.renew()
            assert manager.current == old
        finally:
            await ca.stop()

    try:
        asyncio.run(scenario())
    finally:
        subprocess.run(["umount", "-l", str(certs)], check=False)
