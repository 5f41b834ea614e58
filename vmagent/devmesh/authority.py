"""The development CA's keys: dev root, workload signing, serving cert, dev bootstrap tokens.

Signing follows istiod (``security/pkg/pki/ca/ca.go``): the CSR gives only the public key
(its signature is checked); the SAN is the caller's verified identity; NotBefore = now - 2 min;
NotAfter = now + TTL (TTL <= 0: 24 h; over 90 days: refused), clamped to the root's NotAfter.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmagent.identity.store import DIR_MODE, atomic_write
from vmagent.identity.tokens import CredentialError, Jwt, b64url_encode, encode_jwt_parts

DEV_ISSUER = "vmagent-devmesh"
DEFAULT_TTL = 24 * 3600.0
MAX_TTL = 90 * 24 * 3600.0
BACKDATE = 120.0
ROOT_LIFETIME = 10 * 365 * 24 * 3600.0
SERVING_NAMES = (
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
    "localhost",
    "127.0.0.1",
    "::1",
)


class SigningError(ValueError):
    pass


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_root(trust_domain: str, now: float) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain or "vmagent-devmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, "vmagent devmesh root CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - BACKDATE))
        .not_valid_after(_utc(now + ROOT_LIFETIME))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@dataclasses.dataclass(frozen=True)
class Authority:
    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    token_key: ec.EllipticCurvePrivateKey

    @property
    def root_pem(self) -> str:
        return _pem(self.root_cert)

    @classmethod
    def load_or_create(cls, directory: str | Path, trust_domain: str, now: float) -> Authority:
        """Keys from ``directory`` (root-cert.pem, root-key.pem, token-key.pem); whatever is
        missing is generated and written there (0600, directory 0700)."""
        folder = Path(directory)
        folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        paths = {n: folder / f"{n}.pem" for n in ("root-cert", "root-key", "token-key")}
        if paths["root-cert"].exists() and paths["root-key"].exists():
            root_cert = x509.load_pem_x509_certificate(paths["root-cert"].read_bytes())
            root_key = serialization.load_pem_private_key(paths["root-key"].read_bytes(), None)
            if not isinstance(root_key, ec.EllipticCurvePrivateKey):
                raise SigningError(f"{paths['root-key']}: the dev root key must be ECDSA")
        else:
            root_key, root_cert = make_root(trust_domain, now)
            atomic_write(paths["root-key"], _key_pem(root_key))
            atomic_write(paths["root-cert"], _pem(root_cert).encode(), 0o644)
        if paths["token-key"].exists():
            token_key = serialization.load_pem_private_key(paths["token-key"].read_bytes(), None)
            if not isinstance(token_key, ec.EllipticCurvePrivateKey):
                raise SigningError(f"{paths['token-key']}: the token key must be ECDSA")
        else:
            token_key = ec.generate_private_key(ec.SECP256R1())
            atomic_write(paths["token-key"], _key_pem(token_key))
        os.chmod(folder, DIR_MODE)
        return cls(root_key, root_cert, token_key)

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey | object,
        san: x509.SubjectAlternativeName,
        not_before: float,
        not_after: float,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root_cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(not_before))
            .not_valid_after(_utc(not_after))
            .add_extension(san, critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        return builder.sign(self.root_key, hashes.SHA256())

    def sign_csr(self, csr_pem: str, spiffe_id: str, ttl: float, now: float) -> list[str]:
        """``cert_chain`` for a CSR: [leaf, root], each PEM ending in a newline."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
        except ValueError:
            raise SigningError("CSR is not a PEM certificate request") from None
        if not csr.is_signature_valid:
            raise SigningError("CSR signature does not verify")
        if ttl > MAX_TTL:
            raise SigningError(f"requested TTL {ttl:g}s is above the maximum {MAX_TTL:g}s")
        lifetime = ttl if ttl > 0 else DEFAULT_TTL
        not_after = min(now + lifetime, self.root_cert.not_valid_after_utc.timestamp())
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
        leaf = self._issue(csr.public_key(), san, now - BACKDATE, not_after)
        return [_pem(leaf), self.root_pem]

    def serving_credentials(
        self, now: float, names: tuple[str, ...] = SERVING_NAMES
    ) -> tuple[bytes, bytes]:
        """(key PEM, chain PEM) for the CA's own TLS listener."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(key.public_key(), _san(names), now - BACKDATE, now + 365 * 86400.0)
        return _key_pem(key), (_pem(cert) + self.root_pem).encode()

    def mint_token(
        self, namespace: str, service_account: str, now: float, ttl: float = 3600.0
    ) -> str:
        """A dev bootstrap token, shaped like a Kubernetes projected token (ES256)."""
        claims = {
            "iss": DEV_ISSUER,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "aud": ["istio-ca"],
            "iat": int(now),
            "exp": int(now + ttl),
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": service_account}},
        }
        signing_input = encode_jwt_parts({"alg": "ES256", "typ": "JWT"}, claims)
        der = self.token_key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64url_encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def verify_token_signature(self, jwt: Jwt) -> None:
        if jwt.header.get("alg") != "ES256" or len(jwt.signature) != 64:
            raise CredentialError("dev token: expected an ES256 signature")
        r, s = (int.from_bytes(jwt.signature[i : i + 32], "big") for i in (0, 32))
        try:
            self.token_key.public_key().verify(
                encode_dss_signature(r, s), jwt.signing_input, ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            raise CredentialError("dev token: signature does not verify") from None
