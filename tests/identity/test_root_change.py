"""A stored or current certificate from another root is never presented: re-onboarding to
another mesh or a root rotation makes the agent discard it (saying why) and ask for a new one
with the platform credential. Two real dev CAs (two roots) over TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from vmagent.devmesh.authority import make_root
from vmagent.identity.store import CHAIN_FILE

from .helpers import agent, ca_settings, running_ca

pytestmark = pytest.mark.timeout(90)


def top_issuer(chain: bytes) -> x509.Name:
    return x509.load_pem_x509_certificates(chain)[-1].subject


def root_subject(ca_dir: Path) -> x509.Name:
    return x509.load_pem_x509_certificate((ca_dir / "root-cert.pem").read_bytes()).subject


def distinct_root(ca_dir: Path, name: str) -> None:
    """Pre-create a dev CA's root with its own subject name (dev roots share one name, and a
    verifier picks a root by name)."""
    key, cert = make_root("cluster.local", time.time())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    ca_dir.mkdir(parents=True, mode=0o700)
    (ca_dir / "root-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (ca_dir / "root-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def mint(tmp_path: Path, ca: object) -> None:
    token = ca.authority.mint_token("shop", "cart", time.time())  # type: ignore[attr-defined]
    (tmp_path / "istio-token").write_text(token)


def test_stored_certificate_from_another_root_is_discarded_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Re-onboarded to mesh B with the certificate directory of mesh A: before, the agent kept
    presenting A's certificate (and xDS looped on 'TimeoutError: ')."""
    root_file = tmp_path / "config" / "root-cert.pem"
    root_file.parent.mkdir()
    certs = tmp_path / "state" / "certs"

    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path / "a")) as ca_a:
            shutil.copy(Path(ca_a.settings.directory) / "root-cert.pem", root_file)
            mint(tmp_path, ca_a)
            first = await agent(tmp_path, ca_a, CA_ROOT_CA=str(root_file))
            await first.renew()
        async with running_ca(ca_settings(tmp_path / "b")) as ca_b:
            shutil.copy(Path(ca_b.settings.directory) / "root-cert.pem", root_file)
            mint(tmp_path, ca_b)
            manager = await agent(tmp_path, ca_b, CA_ROOT_CA=str(root_file))
            with caplog.at_level(logging.WARNING, logger="vmagent.identity"):
                assert manager.load_from_disk() is None
            assert manager.client_cert(time.time()) is None
            bundle = await manager.renew()
            assert [i.auth for i in ca_b.service.issued] == ["JWT"]  # the platform credential
            assert top_issuer(bundle.chain_pem) == root_subject(Path(ca_b.settings.directory))
            assert (certs / CHAIN_FILE).read_bytes() == bundle.chain_pem
            assert (certs / (CHAIN_FILE + ".discarded")).exists()  # set aside, not lost

    asyncio.run(scenario())
    discarded = [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()]
    assert len(discarded) == 1
    assert str(root_file) in discarded[0] and "CA_ROOT_CA" in discarded[0]
    assert "not the configured root" in discarded[0]


def test_root_file_replaced_while_running_reissues_with_the_platform_credential(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The root changes under a running agent (root-cert.pem rewritten, the CA now another
    one on the same address): the current cert is discarded within a few seconds and a new one
    is issued by the new CA, authenticated by the token."""
    root_file = tmp_path / "config" / "root-cert.pem"
    root_file.parent.mkdir()

    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path / "a")) as ca_a:
            shutil.copy(Path(ca_a.settings.directory) / "root-cert.pem", root_file)
            mint(tmp_path, ca_a)
            manager = await agent(tmp_path, ca_a, CA_ROOT_CA=str(root_file))
            task = asyncio.ensure_future(manager.run())
            for _ in range(50):
                await asyncio.sleep(0.1)
                if manager.current is not None:
                    break
            assert manager.current is not None
            first = manager.current
            port = ca_a.port
        try:
            settings = ca_settings(tmp_path / "b", listen=f"127.0.0.1:{port}")
            async with running_ca(settings) as ca_b:
                mint(tmp_path, ca_b)
                shutil.copy(Path(ca_b.settings.directory) / "root-cert.pem", root_file)
                for _ in range(150):  # the root is re-read every 5 s; the CSR floor is 5 s
                    await asyncio.sleep(0.1)
                    current = manager.current
                    if current is not None and current.serial != first.serial:
                        break
                current = manager.current
                assert current is not None and current.serial != first.serial
                b_root = root_subject(Path(ca_b.settings.directory))
                assert top_issuer(current.chain_pem) == b_root
                assert [i.auth for i in ca_b.service.issued] == ["JWT"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with caplog.at_level(logging.WARNING, logger="vmagent.identity"):
        asyncio.run(scenario())
    assert any("discarding certificate" in r.getMessage() for r in caplog.records)


def test_client_certificate_refused_in_the_handshake_is_reported_and_reissued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A root bundle holding roots A and B (mid rotation): the agent's cert from A chains to
    the bundle, but CA B does not accept it as a client certificate and ends the handshake.
    The agent says so and gets a new certificate with the platform credential."""
    bundle_file = tmp_path / "config" / "roots.pem"
    bundle_file.parent.mkdir()
    distinct_root(tmp_path / "b" / "devca", "mesh B root")

    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path / "a")) as ca_a:
            root_a = (Path(ca_a.settings.directory) / "root-cert.pem").read_bytes()
            bundle_file.write_bytes(root_a)
            mint(tmp_path, ca_a)
            manager = await agent(tmp_path, ca_a, CA_ROOT_CA=str(bundle_file))
            old = await manager.renew()
            port = ca_a.port
        async with running_ca(ca_settings(tmp_path / "b", listen=f"127.0.0.1:{port}")) as ca_b:
            root_b = (Path(ca_b.settings.directory) / "root-cert.pem").read_bytes()
            bundle_file.write_bytes(root_a + root_b)
            mint(tmp_path, ca_b)
            assert manager.client_cert(time.time()) is not None  # chains to the bundle
            with caplog.at_level(logging.WARNING, logger="vmagent.identity"):
                new = await manager.renew()
            assert new.serial != old.serial
            assert [i.auth for i in ca_b.service.issued] == ["JWT"]

    asyncio.run(scenario())
    refused = [r.getMessage() for r in caplog.records if "refused the workload" in r.getMessage()]
    assert len(refused) == 1 and "platform credential" in refused[0]


def test_a_certificate_istiod_refused_is_replaced_with_the_platform_credential(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The xDS client reports a refused client certificate: the running manager stops
    presenting it and renews at once (CSR floor permitting) with the token."""

    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            mint(tmp_path, ca)
            manager = await agent(tmp_path, ca)
            first = await manager.renew()
            task = asyncio.ensure_future(manager.run())
            try:
                await asyncio.sleep(0.2)
                assert manager.client_cert(time.time()) is not None
                manager.client_cert_refused(first.chain_pem)
                assert manager.client_cert(time.time()) is None
                for _ in range(100):  # the CSR floor: about 5 s after the first CSR
                    await asyncio.sleep(0.1)
                    if manager.current is not None and manager.current.serial != first.serial:
                        break
                assert manager.current is not None and manager.current.serial != first.serial
                assert [i.auth for i in ca.service.issued] == ["JWT", "JWT"]
                assert manager.client_cert(time.time()) is not None  # the new one is presented
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    with caplog.at_level(logging.WARNING, logger="vmagent.identity"):
        asyncio.run(scenario())
    assert any("refused the workload certificate" in r.getMessage() for r in caplog.records)
