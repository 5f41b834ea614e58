"""Pure cores: CSR, reply checks, rotation schedule, bearer encodings."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vmagent.devmesh.authority import Authority
from vmagent.identity import rotation, tokens
from vmagent.identity.certs import ChainError, bundle_from_reply
from vmagent.identity.csr import (
    KeySpecError,
    build_csr,
    key_spec,
    new_private_key,
    private_key_pem,
)

from .helpers import make_config

SPIFFE = "spiffe://cluster.local/ns/shop/sa/cart"


def test_default_key_is_p256_and_csr_has_critical_spiffe_san(tmp_path: Path) -> None:
    spec = key_spec(make_config(tmp_path))
    key = new_private_key(spec)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert private_key_pem(key).startswith(b"-----BEGIN EC PRIVATE KEY-----")
    csr = x509.load_pem_x509_csr(build_csr(key, SPIFFE))
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]
    assert csr.subject.rfc4514_string() == "O="
    assert csr.is_signature_valid
    assert new_private_key(spec).public_key() != key.public_key()


def test_key_options(tmp_path: Path) -> None:
    p384 = new_private_key(key_spec(make_config(tmp_path, ECC_CURVE="P384")))
    assert isinstance(p384, ec.EllipticCurvePrivateKey) and p384.curve.name == "secp384r1"
    rsa_key = new_private_key(key_spec(make_config(tmp_path, ECC_SIGNATURE_ALGORITHM="RSA")))
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and rsa_key.key_size == 2048
    assert private_key_pem(rsa_key).startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    with pytest.raises(KeySpecError, match="WORKLOAD_RSA_KEY_SIZE=1024"):
        rsa_config = make_config(tmp_path, ECC_SIGNATURE_ALGORITHM="RSA")
        key_spec(replace(rsa_config, workload_rsa_key_size=1024))
    with pytest.raises(KeySpecError, match="ECC_SIGNATURE_ALGORITHM"):
        key_spec(replace(make_config(tmp_path), ecc_signature_algorithm="DSA"))


@pytest.fixture(scope="module")
def authorities(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Authority]:
    base = tmp_path_factory.mktemp("cas")
    now = time.time()
    return (
        Authority.load_or_create(base / "a", "cluster.local", now),
        Authority.load_or_create(base / "b", "cluster.local", now),
    )


def test_reply_checks(authorities: tuple[Authority, Authority]) -> None:
    ca, other = authorities
    now = time.time()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr(key, SPIFFE).decode()
    pem = private_key_pem(key)
    good = ca.sign_csr(csr, SPIFFE, 3600, now)
    bundle = bundle_from_reply(good, key, pem, [ca.root_cert], now)
    assert bundle.spiffe_id == SPIFFE and bundle.root_pem == good[-1].encode()
    assert bundle.chain_pem == "".join(good).encode()

    with pytest.raises(ChainError, match="need leaf and root"):
        bundle_from_reply(good[:1], key, pem, [ca.root_cert], now)
    with pytest.raises(ChainError, match="not for our key"):
        bundle_from_reply(good, ec.generate_private_key(ec.SECP256R1()), pem, None, now)
    with pytest.raises(ChainError, match="expired"):
        bundle_from_reply(good, key, pem, [ca.root_cert], now + 7200)
    with pytest.raises(ChainError, match="trusted root"):  # a valid chain from another CA
        bundle_from_reply(other.sign_csr(csr, SPIFFE, 3600, now), key, pem, [ca.root_cert], now)
    with pytest.raises(ChainError, match="not signed by"):  # leaf from one CA, root of another
        bundle_from_reply([good[0], other.root_pem], key, pem, [other.root_cert], now)
    with pytest.raises(ChainError, match="not PEM"):
        bundle_from_reply(["garbage", good[1]], key, pem, None, now)


def test_rotation_at_half_life_with_one_percent_jitter() -> None:
    schedule = rotation.Schedule(0.5, 0.01)
    created, expires = 1000.0, 1000.0 + 86400
    for r in (-1.0, 0.0, 0.999):
        at = rotation.rotation_time(created, expires, schedule, r)
        assert abs(at - (created + 43200)) <= 864 + 1e-6
    state = rotation.on_issued(rotation.RotationState(), created, expires, schedule, 0.0)
    assert rotation.next_action(state, created + 100) == rotation.Wait(created + 43200)
    assert isinstance(rotation.next_action(state, created + 43200), rotation.Renew)


def test_failed_renewals_back_off_but_never_sleep_past_expiry() -> None:
    schedule = rotation.Schedule()
    state = rotation.on_issued(rotation.RotationState(), 0.0, 1000.0, schedule, 0.0)
    now, delays = 500.0, []
    for _ in range(20):
        state = rotation.on_failure(state, "CA down", now, schedule, 0.0)
        assert state.retry_at is not None
        delays.append(state.retry_at - now)
        now = state.retry_at
    assert delays[:4] == [5.0, 10.0, 20.0, 40.0]  # exponential, from the CSR floor
    assert min(delays) >= rotation.MIN_CSR_INTERVAL  # never faster, even close to expiry
    assert state.last_error == "CA down" and state.expires == 1000.0
    late = rotation.on_failure(state, "still down", 5000.0, schedule, 0.0)
    assert late.retry_at == 5000.0 + rotation.RETRY_CAP  # after expiry: capped backoff, for ever
    assert isinstance(rotation.next_action(late, 5061.0), rotation.Renew)
    assert rotation.next_action(rotation.RotationState(), 0.0) == rotation.Renew(
        "no certificate yet"
    )


def test_jwt_and_bearer_encodings() -> None:
    with pytest.raises(tokens.CredentialError, match="not a JWT"):
        tokens.decode_jwt("garbage")
    with pytest.raises(tokens.CredentialError, match="JWT claims is not JSON"):
        tokens.decode_jwt("e30.bm90IGpzb24.c2ln")
    jwt = tokens.decode_jwt(tokens.encode_jwt_parts({"alg": "none"}, {"exp": 100}) + ".c2ln")
    assert jwt.expires_at == 100.0
    with pytest.raises(tokens.CredentialError, match="expired"):
        tokens.check_unexpired(jwt, 200.0, "token")

    aws = tokens.AwsIdentity('{"instanceId": "i-1"}', "MIIB\nAAAA")
    encoded = tokens.encode_aws(aws)
    assert encoded.startswith("vmagent-aws-v1.") and encoded.isascii() and "\n" not in encoded
    assert tokens.decode_aws(encoded) == aws
    azure = tokens.AzureIdentity("pkcs7", "MIIB", "1700000000", {"vmId": "v"})
    assert tokens.decode_azure(tokens.encode_azure(azure)) == azure
    with pytest.raises(tokens.CredentialError, match="not a vmagent-aws-v1"):
        tokens.decode_aws(tokens.encode_azure(azure))
    with pytest.raises(tokens.CredentialError, match="field 'signature'"):
        tokens.decode_aws("vmagent-aws-v1." + tokens.b64url_encode(b'{"document": "x"}'))
