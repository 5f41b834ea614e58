"""The agent against the dev CA over real gRPC + TLS, for every credential source."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from cryptography import x509

from vmagent.identity import IdentityError
from vmagent.identity.certs import spiffe_ids

from .emulators import AwsEmulator, AzureEmulator, CloudKeys, GceEmulator
from .helpers import agent, ca_settings, mode, running_ca

pytestmark = pytest.mark.timeout(60)


def leaf_of(certs_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((certs_dir / "cert-chain.pem").read_bytes())[0]


def check_files(certs_dir: Path, spiffe: str) -> x509.Certificate:
    assert mode(certs_dir) == 0o700
    for name in ("key.pem", "cert-chain.pem", "root-cert.pem"):
        assert mode(certs_dir / name) == 0o600, name
    leaf = leaf_of(certs_dir)
    assert spiffe_ids(leaf) == (spiffe,)
    chain = x509.load_pem_x509_certificates((certs_dir / "cert-chain.pem").read_bytes())
    assert chain[-1] == x509.load_pem_x509_certificate((certs_dir / "root-cert.pem").read_bytes())
    return leaf


def test_token_file_then_cert_renewal_after_token_is_gone(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            token = tmp_path / "istio-token"
            token.write_text(ca.authority.mint_token("shop", "cart", time.time()) + "\n")
            manager = await agent(tmp_path, ca)
            first = await manager.renew()
            certs = tmp_path / "state" / "certs"
            leaf = check_files(certs, "spiffe://cluster.local/ns/shop/sa/cart")
            assert first.serial == leaf.serial_number
            assert ca.service.issued[-1].auth == "JWT"
            assert ca.service.issued[-1].cluster_id == "vm-cluster"

            token.unlink()
            second = await manager.renew()
            assert ca.service.issued[-1].auth == "client-certificate"
            assert second.serial != first.serial
            assert second.key_pem != first.key_pem  # a new key at every rotation
            assert leaf_of(certs).serial_number == second.serial

            # A restart (new manager, no token) reuses the stored cert and renews with it.
            restarted = await agent(tmp_path, ca)
            assert restarted.load_from_disk() is not None
            assert restarted.current is not None
            assert restarted.current.serial == second.serial
            await restarted.renew()
            assert ca.service.issued[-1].auth == "client-certificate"

    asyncio.run(scenario())


def test_no_credential_and_no_cert_is_a_clear_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            manager = await agent(tmp_path, ca)
            with pytest.raises(IdentityError, match=r"istio-token does not exist"):
                await manager.renew()
            assert manager.current is None
            assert not (tmp_path / "state" / "certs" / "cert-chain.pem").exists()

    asyncio.run(scenario())


def test_ca_rejects_a_token_it_did_not_sign(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            running_ca(ca_settings(tmp_path / "a")) as ca,
            running_ca(ca_settings(tmp_path / "b")) as other,
        ):
            (tmp_path / "istio-token").write_text(
                other.authority.mint_token("shop", "cart", time.time())
            )
            manager = await agent(tmp_path, ca)
            with pytest.raises(IdentityError, match="UNAUTHENTICATED"):
                await manager.renew()

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    asyncio.run(scenario())


@pytest.mark.parametrize("source", ["GoogleComputeEngine", "AWS", "Azure"])
def test_cloud_source_end_to_end(tmp_path: Path, source: str) -> None:
    keys = CloudKeys()
    emulator_class = {
        "GoogleComputeEngine": GceEmulator,
        "AWS": AwsEmulator,
        "Azure": AzureEmulator,
    }[source]
    expected = {
        "GoogleComputeEngine": "spiffe://cluster.local/ns/gce-ns/sa/gce-sa",
        "AWS": "spiffe://cluster.local/ns/aws-ns/sa/aws-sa",
        "Azure": "spiffe://cluster.local/ns/azure-ns/sa/azure-sa",
    }[source]

    async def scenario(emulator: GceEmulator | AwsEmulator | AzureEmulator) -> None:
        async with running_ca(ca_settings(tmp_path, keys)) as ca:
            manager = await agent(
                tmp_path,
                ca,
                CREDENTIAL_FETCHER_TYPE=source,
                GCE_METADATA_HOST=f"127.0.0.1:{emulator.port}",
                AWS_EC2_METADATA_SERVICE_ENDPOINT=emulator.url,
                VMAGENT_AZURE_METADATA_ENDPOINT=emulator.url,
            )
            await manager.renew()
            # The SAN comes from the verified cloud identity, not from the CSR (shop/cart).
            check_files(tmp_path / "state" / "certs", expected)
            assert ca.service.issued[-1].auth == source

            emulator.fault = 500  # metadata server broken: renewal uses the workload cert
            await manager.renew()
            assert ca.service.issued[-1].auth == "client-certificate"
            assert spiffe_ids(leaf_of(tmp_path / "state" / "certs")) == (expected,)

    with emulator_class(keys) as emulator:
        asyncio.run(scenario(emulator))
        if source == "AWS":  # IMDSv2 only: every read carried a session token
            reads = [r for r in emulator.requests if r[0] == "GET"]
            assert reads and all("x-aws-ec2-metadata-token" in h for _, _, h in reads)
