"""Turning a bearer credential into a verified caller (namespace, service account).

- dev tokens (``iss: vmagent-devmesh``, ES256 by the dev token key): identity from ``sub``;
- GCE identity JWTs: RS256 against the configured JWKS, ``aud`` = trust domain, ``iss``, ``exp``;
- AWS (``vmagent-aws-v1.``): PKCS#7 signature over exactly the document, configured certs;
- Azure (``vmagent-azure-v1.``): PKCS#7 attested document signed by a cert issued by a
  configured cert, its nonce equal to the one sent, fresh, and not seen before.
Cloud callers are mapped to namespace/service account by the ``identities`` rules.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vmagent.devmesh import pkcs7
from vmagent.devmesh.authority import DEV_ISSUER, Authority
from vmagent.devmesh.settings import DevCaSettings
from vmagent.identity.tokens import (
    AWS,
    AWS_PREFIX,
    AZURE,
    AZURE_PREFIX,
    GCE,
    JWT,
    CredentialError,
    Jwt,
    b64url_decode,
    check_unexpired,
    decode_aws,
    decode_azure,
    decode_jwt,
)

LEEWAY = 60.0


class NotMapped(CredentialError):
    """The credential verified but no identity rule matches it."""


@dataclasses.dataclass(frozen=True)
class Caller:
    namespace: str
    service_account: str
    source: str
    detail: str


def load_jwks(text: str) -> dict[str, rsa.RSAPublicKey]:
    """RSA keys of a JWKS document by ``kid``."""
    keys: dict[str, rsa.RSAPublicKey] = {}
    for entry in json.loads(text).get("keys", []):
        if entry.get("kty") == "RSA":
            n = int.from_bytes(b64url_decode(entry["n"]), "big")
            e = int.from_bytes(b64url_decode(entry["e"]), "big")
            keys[str(entry.get("kid", ""))] = rsa.RSAPublicNumbers(e, n).public_key()
    return keys


def _load_certs(paths: tuple[str, ...]) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for path in paths:
        certs.extend(x509.load_pem_x509_certificates(Path(path).read_bytes()))
    return certs


def _audiences(claims: Mapping[str, Any]) -> list[str]:
    aud = claims.get("aud")
    return [aud] if isinstance(aud, str) else [a for a in aud or [] if isinstance(a, str)]


def _pkcs7_der(text: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error:
        raise CredentialError(f"{what}: signature is not base64") from None


def _azure_time(text: Any) -> float:
    try:
        return datetime.datetime.strptime(str(text), "%m/%d/%y %H:%M:%S %z").timestamp()
    except ValueError:
        raise CredentialError(f"Azure attested document: bad timestamp {text!r}") from None


class Verifier:
    def __init__(self, settings: DevCaSettings, authority: Authority) -> None:
        self.settings = settings
        self.authority = authority
        self.jwks = load_jwks(Path(settings.gce_jwks).read_text()) if settings.gce_jwks else {}
        self.aws_certs = _load_certs(settings.aws_certificates)
        self.azure_anchors = _load_certs(settings.azure_certificates)
        self._seen_nonces: dict[tuple[str, str], float] = {}

    def verify(self, token: str, now: float) -> Caller:
        if token.startswith(AWS_PREFIX):
            return self._map(AWS, self._aws(token, now))
        if token.startswith(AZURE_PREFIX):
            return self._map(AZURE, self._azure(token, now))
        jwt = decode_jwt(token)
        if jwt.claims.get("iss") == DEV_ISSUER:
            return self._dev(jwt, now)
        if jwt.claims.get("iss") == self.settings.gce_issuer and self.jwks:
            return self._map(GCE, self._gce(jwt, now))
        raise CredentialError(f"JWT from unknown issuer {jwt.claims.get('iss')!r}")

    def _map(self, source: str, attrs: Mapping[str, str]) -> Caller:
        for rule in self.settings.identities:
            if rule.source == source and all(attrs.get(k) == v for k, v in rule.match.items()):
                detail = " ".join(f"{k}={attrs.get(k)}" for k in sorted(rule.match))
                return Caller(rule.namespace, rule.service_account, source, detail)
        shown = " ".join(f"{k}={v}" for k, v in sorted(attrs.items()))
        raise NotMapped(f"{source} caller has no identity mapping ({shown})")

    def _dev(self, jwt: Jwt, now: float) -> Caller:
        self.authority.verify_token_signature(jwt)
        check_unexpired(jwt, now, "dev token")
        if "istio-ca" not in _audiences(jwt.claims):
            raise CredentialError("dev token: audience is not istio-ca")
        parts = str(jwt.claims.get("sub", "")).split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"] or not all(parts[2:]):
            raise CredentialError("dev token: sub is not system:serviceaccount:NS:SA")
        return Caller(parts[2], parts[3], JWT, str(jwt.claims["sub"]))

    def _gce(self, jwt: Jwt, now: float) -> dict[str, str]:
        if jwt.header.get("alg") != "RS256":
            raise CredentialError("GCE token: expected RS256")
        key = self.jwks.get(str(jwt.header.get("kid", "")))
        if key is None:
            raise CredentialError(f"GCE token: unknown key id {jwt.header.get('kid')!r}")
        try:
            key.verify(jwt.signature, jwt.signing_input, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise CredentialError("GCE token: signature does not verify") from None
        check_unexpired(jwt, now - LEEWAY, "GCE token")
        if self.settings.trust_domain not in _audiences(jwt.claims):
            raise CredentialError(
                f"GCE token: audience {jwt.claims.get('aud')!r} is not the trust domain"
                f" {self.settings.trust_domain!r}"
            )
        compute = jwt.claims.get("google", {}).get("compute_engine", {})
        attrs = {k: str(v) for k, v in compute.items() if isinstance(v, (str, int))}
        for claim in ("email", "sub"):
            if claim in jwt.claims:
                attrs[claim] = str(jwt.claims[claim])
        return attrs

    def _aws(self, token: str, now: float) -> dict[str, str]:
        identity = decode_aws(token)
        signed = pkcs7.parse_signed_data(_pkcs7_der(identity.signature, "AWS"))
        valid = [c for c in self.aws_certs if c.not_valid_after_utc.timestamp() > now]
        try:
            pkcs7.verify(signed, identity.document.encode("utf-8"), valid)
        except pkcs7.Pkcs7Error as exc:
            raise CredentialError(f"AWS identity document: {exc}") from None
        try:
            document = json.loads(identity.document)
        except json.JSONDecodeError:
            raise CredentialError("AWS identity document is not JSON") from None
        return {k: str(v) for k, v in document.items() if isinstance(v, (str, int))}

    def _azure_signers(
        self, embedded: list[x509.Certificate], now: float
    ) -> list[x509.Certificate]:
        found = []
        for cert in embedded:
            if not (
                cert.not_valid_before_utc.timestamp() <= now < cert.not_valid_after_utc.timestamp()
            ):
                continue
            for anchor in self.azure_anchors:
                try:
                    cert.verify_directly_issued_by(anchor)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                found.append(cert)
                break
        return found

    def _azure(self, token: str, now: float) -> dict[str, str]:
        identity = decode_azure(token)
        what = "Azure attested document"
        if identity.encoding.lower() != "pkcs7":
            raise CredentialError(f"{what}: encoding {identity.encoding!r} is not pkcs7")
        signed = pkcs7.parse_signed_data(_pkcs7_der(identity.signature, what))
        if signed.content is None:
            raise CredentialError(f"{what}: no content")
        try:
            pkcs7.verify(signed, signed.content, self._azure_signers(signed.certificates, now))
            data = json.loads(signed.content)
        except pkcs7.Pkcs7Error as exc:
            raise CredentialError(f"{what}: {exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CredentialError(f"{what}: content is not JSON") from None
        if data.get("nonce") != identity.nonce:
            raise CredentialError(f"{what}: nonce does not match the one sent")
        if not identity.nonce.isdigit() or abs(now - int(identity.nonce)) > (
            self.settings.azure_nonce_max_age
        ):
            raise CredentialError(f"{what}: nonce {identity.nonce!r} is not a recent time")
        if _azure_time(data.get("timeStamp", {}).get("expiresOn")) <= now:
            raise CredentialError(f"{what}: expired")
        vm_id = str(data.get("vmId", ""))
        if identity.instance.get("vmId", vm_id) != vm_id:
            raise CredentialError(f"{what}: instance metadata vmId differs from the attested one")
        self._seen_nonces = {k: t for k, t in self._seen_nonces.items() if t > now}
        if (vm_id, identity.nonce) in self._seen_nonces:
            raise CredentialError(f"{what}: nonce already used (replay)")
        self._seen_nonces[(vm_id, identity.nonce)] = now + 2 * self.settings.azure_nonce_max_age
        return {k: str(v) for k, v in data.items() if isinstance(v, (str, int))}
