"""The dev CA's credential checks: what it must refuse, and the CSR it must not believe."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from identity.emulators import CloudKeys, make_cert
from identity.helpers import ca_settings

from vmagent.devmesh.authority import Authority, SigningError
from vmagent.devmesh.verify import NotMapped, Verifier
from vmagent.identity.csr import build_csr
from vmagent.identity.tokens import (
    AwsIdentity,
    AzureIdentity,
    CredentialError,
    encode_aws,
    encode_azure,
)


@pytest.fixture(scope="module")
def keys() -> CloudKeys:
    return CloudKeys()


@pytest.fixture()
def verifier(tmp_path: Path, keys: CloudKeys) -> Verifier:
    settings = ca_settings(tmp_path, keys)
    return Verifier(
        settings, Authority.load_or_create(settings.directory, "cluster.local", time.time())
    )


def test_dev_tokens(verifier: Verifier, tmp_path: Path) -> None:
    now = time.time()
    caller = verifier.verify(verifier.authority.mint_token("shop", "cart", now), now)
    assert (caller.namespace, caller.service_account, caller.source) == ("shop", "cart", "JWT")
    with pytest.raises(CredentialError, match="expired"):
        verifier.verify(verifier.authority.mint_token("shop", "cart", now - 7200), now)
    stranger = Authority.load_or_create(tmp_path / "stranger", "cluster.local", now)
    with pytest.raises(CredentialError, match="signature does not verify"):
        verifier.verify(stranger.mint_token("shop", "cart", now), now)


def test_gce_jwt_checks(verifier: Verifier, keys: CloudKeys) -> None:
    now = time.time()
    caller = verifier.verify(keys.gce_jwt("cluster.local"), now)
    assert (caller.namespace, caller.service_account) == ("gce-ns", "gce-sa")
    with pytest.raises(CredentialError, match="audience"):
        verifier.verify(keys.gce_jwt("https://example.com"), now)
    with pytest.raises(CredentialError, match="expired"):
        verifier.verify(keys.gce_jwt("cluster.local", lifetime=-600), now)
    with pytest.raises(CredentialError, match="unknown issuer"):
        verifier.verify(keys.gce_jwt("cluster.local", iss="https://evil.example"), now)
    forged = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CredentialError, match="signature does not verify"):
        verifier.verify(keys.gce_jwt("cluster.local", key=forged), now)
    other_vm = keys.gce_jwt(
        "cluster.local",
        google={"compute_engine": {"project_id": "my-project", "instance_name": "vm-2"}},
    )
    with pytest.raises(NotMapped, match="instance_name=vm-2"):
        verifier.verify(other_vm, now)


def test_aws_document_checks(verifier: Verifier, keys: CloudKeys) -> None:
    now = time.time()
    document = keys.aws_document()
    signature = keys.aws_signature(document)
    caller = verifier.verify(encode_aws(AwsIdentity(document, signature)), now)
    assert (caller.namespace, caller.service_account) == ("aws-ns", "aws-sa")
    tampered = document.replace("i-0abc123", "i-0evil00")
    with pytest.raises(CredentialError, match="does not verify"):
        verifier.verify(encode_aws(AwsIdentity(tampered, signature)), now)
    with pytest.raises(CredentialError, match="does not verify"):  # signed by an unknown key
        verifier.verify(encode_aws(AwsIdentity(tampered, CloudKeys().aws_signature(tampered))), now)
    with pytest.raises(CredentialError, match=r"not base64|malformed"):
        verifier.verify(encode_aws(AwsIdentity(document, "!!!")), now)
    unmapped = keys.aws_document("i-0other")
    with pytest.raises(NotMapped):
        verifier.verify(encode_aws(AwsIdentity(unmapped, keys.aws_signature(unmapped))), now)


def azure_token(keys: CloudKeys, nonce: str, vm_id: str = "vm-1", **kw: object) -> str:
    attested = keys.azure_attested(nonce, vm_id, **kw)  # type: ignore[arg-type]
    return encode_azure(
        AzureIdentity(attested["encoding"], attested["signature"], nonce, {"vmId": vm_id})
    )


def test_azure_attested_document_checks(verifier: Verifier, keys: CloudKeys) -> None:
    now = time.time()
    nonce = str(int(now))
    caller = verifier.verify(azure_token(keys, nonce), now)
    assert (caller.namespace, caller.service_account) == ("azure-ns", "azure-sa")
    with pytest.raises(CredentialError, match="replay"):
        verifier.verify(azure_token(keys, nonce), now)
    with pytest.raises(CredentialError, match="not a recent time"):
        verifier.verify(azure_token(keys, str(int(now) - 3600)), now)
    attested = keys.azure_attested(str(int(now) - 1), "vm-1")
    mismatch = encode_azure(
        AzureIdentity("pkcs7", attested["signature"], str(int(now) - 2), {"vmId": "vm-1"})
    )
    with pytest.raises(CredentialError, match="nonce does not match"):
        verifier.verify(mismatch, now)
    rogue_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rogue = make_cert("metadata.azure.com", rogue_key)  # self-signed, not from the trusted CA
    with pytest.raises(CredentialError, match="does not verify"):
        verifier.verify(azure_token(keys, str(int(now) - 3), signer=(rogue, rogue_key)), now)
    with pytest.raises(CredentialError, match="expired"):
        verifier.verify(azure_token(keys, str(int(now) - 4), lifetime=-60), now)
    lying = json.loads(json.dumps({"vmId": "someone-else"}))
    attested = keys.azure_attested(str(int(now) - 5), "vm-1")
    with pytest.raises(CredentialError, match="vmId differs"):
        verifier.verify(
            encode_azure(AzureIdentity("pkcs7", attested["signature"], str(int(now) - 5), lying)),
            now,
        )


def test_issued_san_comes_from_the_caller_not_the_csr(verifier: Verifier) -> None:
    authority = verifier.authority
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr(key, "spiffe://cluster.local/ns/kube-system/sa/admin").decode()
    now = time.time()
    chain = authority.sign_csr(csr, "spiffe://cluster.local/ns/shop/sa/cart", 600, now)
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/shop/sa/cart"
    ]
    assert leaf.not_valid_before_utc.timestamp() == pytest.approx(now - 120, abs=2)
    assert leaf.not_valid_after_utc.timestamp() == pytest.approx(now + 600, abs=2)
    with pytest.raises(SigningError, match="above the maximum"):
        authority.sign_csr(csr, "spiffe://x", 91 * 86400, now)
    with pytest.raises(SigningError, match="not a PEM"):
        authority.sign_csr("garbage", "spiffe://x", 600, now)
