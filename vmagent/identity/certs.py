"""Certificate bundles and the checks a CA reply must pass before it replaces anything (pure)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from vmagent.identity.csr import PrivateKey, public_key_der

CLOCK_SKEW = 300.0  # seconds a leaf's NotBefore may lie in the future


class ChainError(ValueError):
    """A certificate chain (from the CA or from disk) is unusable; the message says why."""


@dataclasses.dataclass(frozen=True)
class CertBundle:
    """What SDS serves and the files hold: key, full chain (leaf first, root last), root."""

    key_pem: bytes
    chain_pem: bytes
    root_pem: bytes
    spiffe_ids: tuple[str, ...]
    serial: int
    not_before: float
    not_after: float
    created: float  # when it was received (rotation is measured from here)

    @property
    def spiffe_id(self) -> str:
        return self.spiffe_ids[0] if self.spiffe_ids else ""

    def serial_hex(self) -> str:
        return f"{self.serial:x}"


def parse_certs(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ChainError(f"{what}: not PEM certificates") from None
    if not certs:
        raise ChainError(f"{what}: no certificate")
    return certs


def load_private_key(data: bytes, what: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ChainError(f"{what}: not a PEM private key") from None
    if not isinstance(key, PrivateKey):
        raise ChainError(f"{what}: unsupported key type {type(key).__name__}")
    return key


def spiffe_ids(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_chain(
    certs: Sequence[x509.Certificate],
    key: PrivateKey,
    trusted: Sequence[x509.Certificate] | None,
    now: float,
) -> None:
    """Leaf first, root last: at least two certs, the leaf holds ``key``'s public key, nothing
    is expired, each cert is signed by the next, and the last is (or is signed by) a trusted
    root when ``trusted`` is given (None: the OS trust store verified the CA, trust the reply)."""
    if len(certs) < 2:
        raise ChainError(f"chain has {len(certs)} certificate(s); the CA must send leaf and root")
    leaf = certs[0]
    if public_key_der(leaf) != public_key_der(key):
        raise ChainError("leaf certificate is not for our key")
    for position, cert in enumerate(certs):
        name = "leaf" if position == 0 else f"certificate {position}"
        if cert.not_valid_after_utc.timestamp() <= now:
            raise ChainError(f"{name} expired at {cert.not_valid_after_utc.isoformat()}")
    if leaf.not_valid_before_utc.timestamp() > now + CLOCK_SKEW:
        raise ChainError(f"leaf is not valid before {leaf.not_valid_before_utc.isoformat()}")
    for position in range(len(certs) - 1):
        if not _issued_by(certs[position], certs[position + 1]):
            raise ChainError(f"certificate {position} is not signed by certificate {position + 1}")
    if trusted is not None:
        last = certs[-1]
        if not any(last == root or _issued_by(last, root) for root in trusted):
            raise ChainError("chain does not lead to the trusted root certificate")


def bundle_from_reply(
    chain: Sequence[str],
    key: PrivateKey,
    key_pem: bytes,
    trusted: Sequence[x509.Certificate] | None,
    now: float,
) -> CertBundle:
    """Validate a ``CreateCertificate`` reply and make the bundle to serve and store."""
    if len(chain) < 2:
        raise ChainError(f"invalid CertChain: {len(chain)} element(s), need leaf and root")
    pems = [c if c.endswith("\n") else c + "\n" for c in chain]
    certs: list[x509.Certificate] = []
    for position, pem in enumerate(pems):
        certs.extend(parse_certs(pem.encode("utf-8"), f"cert_chain[{position}]"))
    check_chain(certs, key, trusted, now)
    check_spiffe_ids(certs[0], "the CA issued a certificate with the")
    return _bundle(key_pem, "".join(pems).encode(), pems[-1].encode(), certs[0], now)


def bundle_from_files(
    key_pem: bytes, chain_pem: bytes, root_pem: bytes, created: float, now: float
) -> CertBundle:
    """Validate files read from disk; ``created`` is clamped into the leaf's validity."""
    key = load_private_key(key_pem, "key.pem")
    certs = parse_certs(chain_pem, "cert-chain.pem")
    roots = parse_certs(root_pem, "root-cert.pem")
    check_chain(certs, key, roots, now)
    leaf = certs[0]
    check_spiffe_ids(leaf, "cert-chain.pem: the stored certificate has a")
    start, end = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    return _bundle(key_pem, chain_pem, root_pem, leaf, min(max(created, start), end))


_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = _TD_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def spiffe_id_problem(uri: str) -> str:
    """Why ``uri`` is not a valid SPIFFE ID ("" if it is).

    Rules of the SPIFFE ID standard (spiffe/spiffe ``standards/SPIFFE-ID.md`` §2, as
    go-spiffe's ``spiffeid.FromString`` enforces them): scheme ``spiffe://``; a non-empty
    trust domain of ``[a-z0-9._-]`` (no port, no user info); path segments of
    ``[A-Za-z0-9._-]``, none empty, ``.`` or ``..``; no query or fragment; at most 2048 bytes.
    """
    if not uri.startswith("spiffe://"):
        return "does not start with spiffe://"
    if len(uri.encode("utf-8")) > 2048:
        return "is longer than 2048 bytes"
    domain, _, path = uri[len("spiffe://") :].partition("/")
    if not domain:
        return "has no trust domain"
    bad = sorted(set(domain) - _TD_CHARS)
    if bad:
        return f"has a trust domain {domain!r} with characters not allowed: {''.join(bad)!r}"
    if path or uri.endswith("/"):
        for segment in path.split("/"):
            if segment in ("", ".", ".."):
                return f"has an empty, '.' or '..' path segment in /{path}"
            if set(segment) - _PATH_CHARS:
                return f"has a path segment {segment!r} with characters not allowed"
    return ""


def check_spiffe_ids(leaf: x509.Certificate, what: str) -> None:
    """ChainError if a ``spiffe:`` URI SAN of ``leaf`` is malformed (e.g. ``spiffe:///ns/x``
    from a CA whose trust domain is empty): the CA is misconfigured and peers would refuse
    the certificate, so it is never adopted."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if not uri.lower().startswith("spiffe:"):
            continue
        problem = spiffe_id_problem(uri)
        if problem:
            raise ChainError(
                f"{what} SPIFFE ID {uri!r}, which {problem}: the CA is misconfigured (it must "
                "issue spiffe://<trust domain>/ns/<namespace>/sa/<account>; istiod's trust "
                "domain is meshConfig.trustDomain); the certificate is not used"
            )


def _bundle(
    key_pem: bytes, chain_pem: bytes, root_pem: bytes, leaf: x509.Certificate, created: float
) -> CertBundle:
    return CertBundle(
        key_pem=key_pem,
        chain_pem=chain_pem,
        root_pem=root_pem,
        spiffe_ids=spiffe_ids(leaf),
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        created=created,
    )


def trust_domain_of(spiffe_id: str) -> str:
    """``spiffe://<trust domain>/...`` -> trust domain ("" if not a valid SPIFFE ID)."""
    if spiffe_id_problem(spiffe_id):
        return ""
    return spiffe_id[len("spiffe://") :].split("/", 1)[0]


def root_mismatch(bundle: CertBundle, trusted: Sequence[x509.Certificate] | None) -> str:
    """Why ``bundle`` does not chain to the configured roots ("" when it does, or when the OS
    trust store is used: nothing to compare with). Used to discard a stored or current cert
    after a re-onboarding or root rotation (the control plane would refuse it)."""
    if trusted is None:
        return ""
    try:
        certs = parse_certs(bundle.chain_pem, "cert-chain.pem")
    except ChainError as exc:
        return str(exc)
    top = certs[-1]
    if any(top == root or _issued_by(top, root) for root in trusted):
        return ""
    issuer = top.issuer.rfc4514_string() or "(empty name)"
    return f"its chain ends at {issuer!r}, which is not the configured root certificate"
