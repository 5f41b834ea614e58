"""Bearer credentials as plain values: JWT decoding and the AWS/Azure bearer encoding.

Pure functions only. GCE identity tokens and token files travel as they are: Istio's agent sends
the token file's content as an opaque bearer token (``pkg/istio-agent``, ``CredFetcher``), so a
token that is not a JWT is sent unchanged too; a JWT is decoded only to learn its expiry
(:func:`inspect_token`). AWS and Azure documents are wrapped in the vmagent bearer encoding
(``docs/identity.md``)::

    vmagent-aws-v1.<base64url(JSON {"document", "signature"})>
    vmagent-azure-v1.<base64url(JSON {"encoding", "signature", "nonce", "instance"})>

base64url without padding, JSON in UTF-8. A verifying CA decodes them with :func:`decode_aws`
and :func:`decode_azure`; the version suffix changes only with an incompatible change.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

AWS_PREFIX = "vmagent-aws-v1."
AZURE_PREFIX = "vmagent-azure-v1."

# Sources, named as CREDENTIAL_FETCHER_TYPE names them.
JWT = "JWT"
GCE = "GoogleComputeEngine"
AWS = "AWS"
AZURE = "Azure"
SOURCES = (JWT, GCE, AWS, AZURE)


class CredentialError(Exception):
    """A platform credential could not be obtained or is unusable; the message says why."""


@dataclasses.dataclass(frozen=True)
class Credential:
    """A bearer credential for the CA, with what is known about it."""

    source: str
    token: str
    expires_at: float | None = None  # UNIX seconds, when known
    origin: str = ""  # where it came from, for logs and ``identity show``


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; ValueError on anything else."""
    if not text.isascii() or any(c in text for c in "+/ \n"):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CredentialError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise CredentialError(f"{what} is not a JSON object")
    return value


@dataclasses.dataclass(frozen=True)
class Jwt:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def expires_at(self) -> float | None:
        exp = self.claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None

    @property
    def issued_at(self) -> float | None:
        iat = self.claims.get("iat")
        return float(iat) if isinstance(iat, (int, float)) and not isinstance(iat, bool) else None


def decode_jwt(token: str) -> Jwt:
    """Split and decode a compact JWS without verifying it; CredentialError if malformed."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise CredentialError("not a JWT (expected three base64url parts separated by dots)")
    try:
        header_raw, claims_raw, signature = (b64url_decode(p) for p in parts)
    except ValueError:
        raise CredentialError("not a JWT (a part is not base64url)") from None
    header = _json_object(header_raw, "JWT header")
    claims = _json_object(claims_raw, "JWT claims")
    return Jwt(header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """What can be learned from a bearer token without trusting it.

    ``expires_at``/``issued_at`` are UNIX seconds from the JWT's ``exp``/``iat`` claims, None
    when unknown; ``problem`` says why the expiry is unknown ("" when it is known).
    """

    expires_at: float | None
    issued_at: float | None
    problem: str


def inspect_token(token: str) -> TokenInfo:
    """Decode ``token`` as a JWT only to learn its lifetime; never fails (opaque tokens, e.g.
    non-JWT service account tokens, are valid bearer credentials and are sent as they are)."""
    try:
        jwt = decode_jwt(token)
    except CredentialError as exc:
        return TokenInfo(None, None, str(exc))
    if jwt.expires_at is None:
        return TokenInfo(None, jwt.issued_at, "JWT has no numeric exp claim")
    return TokenInfo(jwt.expires_at, jwt.issued_at, "")


def check_unexpired(jwt: Jwt | TokenInfo, now: float, what: str) -> None:
    """CredentialError if the token has an ``exp`` at or before ``now``."""
    exp = jwt.expires_at
    if exp is not None and exp <= now:
        raise CredentialError(f"{what} expired {int(now - exp)}s ago (exp={int(exp)})")


def encode_jwt_parts(header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    """``base64url(header).base64url(claims)``: the signing input of a new JWT."""
    h = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    c = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    return f"{h}.{c}"


def _wrap(prefix: str, body: Mapping[str, Any]) -> str:
    return prefix + b64url_encode(json.dumps(body, separators=(",", ":")).encode("utf-8"))


def _unwrap(prefix: str, token: str) -> dict[str, Any]:
    if not token.startswith(prefix):
        raise CredentialError(f"not a {prefix[:-1]} bearer credential")
    try:
        raw = b64url_decode(token[len(prefix) :])
    except ValueError:
        raise CredentialError(f"{prefix[:-1]} credential is not base64url") from None
    return _json_object(raw, f"{prefix[:-1]} credential")


def _string_field(body: Mapping[str, Any], key: str, what: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise CredentialError(f"{what}: field {key!r} missing or not a string")
    return value


@dataclasses.dataclass(frozen=True)
class AwsIdentity:
    """An EC2 instance identity document and its PKCS#7 ``rsa2048`` signature (base64 DER)."""

    document: str
    signature: str


def encode_aws(identity: AwsIdentity) -> str:
    return _wrap(AWS_PREFIX, {"document": identity.document, "signature": identity.signature})


def decode_aws(token: str) -> AwsIdentity:
    body = _unwrap(AWS_PREFIX, token)
    what = "AWS credential"
    return AwsIdentity(
        _string_field(body, "document", what), _string_field(body, "signature", what)
    )


@dataclasses.dataclass(frozen=True)
class AzureIdentity:
    """An Azure attested document (PKCS#7, base64) with the nonce asked for, plus a few
    unverified instance metadata fields (``compute`` subset) for the CA's logs and checks."""

    encoding: str
    signature: str
    nonce: str
    instance: Mapping[str, str]


def encode_azure(identity: AzureIdentity) -> str:
    body = {
        "encoding": identity.encoding,
        "signature": identity.signature,
        "nonce": identity.nonce,
        "instance": dict(identity.instance),
    }
    return _wrap(AZURE_PREFIX, body)


def decode_azure(token: str) -> AzureIdentity:
    body = _unwrap(AZURE_PREFIX, token)
    what = "Azure credential"
    instance = body.get("instance", {})
    if not isinstance(instance, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in instance.items()
    ):
        raise CredentialError(f"{what}: field 'instance' must map strings to strings")
    return AzureIdentity(
        _string_field(body, "encoding", what),
        _string_field(body, "signature", what),
        _string_field(body, "nonce", what),
        instance,
    )
