"""Workload keys and certificate signing requests, as Istio's agent builds them (pure)."""

from __future__ import annotations

import dataclasses

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from vmagent.config import Config

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
MIN_RSA_BITS = 2048


class KeySpecError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class KeySpec:
    algorithm: str  # "ECDSA" or "RSA"
    curve: str = "P256"
    rsa_bits: int = MIN_RSA_BITS

    def describe(self) -> str:
        return f"ECDSA {self.curve}" if self.algorithm == "ECDSA" else f"RSA {self.rsa_bits}"


def key_spec(config: Config) -> KeySpec:
    """ECDSA P-256 by default; ``ECC_CURVE=P384`` as in Istio; RSA when the algorithm is RSA
    or empty (Istio's default), with ``WORKLOAD_RSA_KEY_SIZE`` bits."""
    algorithm = config.ecc_signature_algorithm.strip().upper()
    if algorithm == "ECDSA":
        curve = "P384" if config.ecc_curve.strip().upper() == "P384" else "P256"
        return KeySpec("ECDSA", curve=curve)
    if algorithm in ("RSA", ""):
        if config.workload_rsa_key_size < MIN_RSA_BITS:
            raise KeySpecError(
                f"WORKLOAD_RSA_KEY_SIZE={config.workload_rsa_key_size}: must be at least"
                f" {MIN_RSA_BITS}"
            )
        return KeySpec("RSA", rsa_bits=config.workload_rsa_key_size)
    raise KeySpecError(
        f"ECC_SIGNATURE_ALGORITHM={config.ecc_signature_algorithm!r}: expected ECDSA or RSA"
    )


def new_private_key(spec: KeySpec) -> PrivateKey:
    if spec.algorithm == "ECDSA":
        curve: ec.EllipticCurve = ec.SECP384R1() if spec.curve == "P384" else ec.SECP256R1()
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=spec.rsa_bits)


def private_key_pem(key: PrivateKey) -> bytes:
    """SEC1 ``EC PRIVATE KEY`` or PKCS#1 ``RSA PRIVATE KEY``, Istio's default encodings."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def config_spiffe_id(config: Config) -> str:
    return spiffe_id(config.trust_domain, config.namespace, config.service_account)


def build_csr(key: PrivateKey, identity: str) -> bytes:
    """PEM CSR: subject ``O=`` (Istio's empty organisation), critical URI SAN ``identity``."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True
        )
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def public_key_der(key: PrivateKey | x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    public = key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
