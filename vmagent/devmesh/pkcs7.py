"""Just enough PKCS#7 / CMS SignedData (RFC 5652) to verify AWS and Azure identity documents.

``cryptography`` can sign PKCS#7 but not verify it, so this reads the DER itself: content,
embedded certificates and signer infos, then checks the RSA or ECDSA signature (over the
signed attributes, whose messageDigest must match the content, or over the content).
"""

from __future__ import annotations

import dataclasses

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "1.3.14.3.2.26": hashes.SHA1,
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
}


class Pkcs7Error(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Tlv:
    tag: int
    raw: bytes  # the whole element, header included
    value: bytes

    def children(self) -> list[Tlv]:
        items, pos = [], 0
        while pos < len(self.value):
            item, pos = read_tlv(self.value, pos)
            items.append(item)
        return items


def read_tlv(data: bytes, pos: int) -> tuple[Tlv, int]:
    """One DER element at ``pos``: (element, position after it)."""
    if pos + 2 > len(data):
        raise Pkcs7Error("truncated DER")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise Pkcs7Error("multi-byte DER tags are not supported")
    head = pos + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or head + count > len(data):
            raise Pkcs7Error("unsupported DER length")
        length = int.from_bytes(data[head : head + count], "big")
        head += count
    end = head + length
    if end > len(data):
        raise Pkcs7Error("truncated DER")
    return Tlv(tag, data[pos:end], data[head:end]), end


def decode_oid(tlv: Tlv) -> str:
    if tlv.tag != 0x06 or not tlv.value:
        raise Pkcs7Error("expected an OBJECT IDENTIFIER")
    first, rest = divmod(tlv.value[0], 40) if tlv.value[0] < 80 else (2, tlv.value[0] - 80)
    parts, acc = [first, rest], 0
    for byte in tlv.value[1:]:
        acc = (acc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(acc)
            acc = 0
    return ".".join(map(str, parts))


@dataclasses.dataclass(frozen=True)
class SignerInfo:
    serial: int | None
    digest_oid: str
    signed_attrs: bytes | None  # DER re-tagged as SET, what the signature covers
    message_digest: bytes | None
    signature: bytes


@dataclasses.dataclass(frozen=True)
class SignedData:
    content: bytes | None
    certificates: list[x509.Certificate]
    signers: list[SignerInfo]


def _octets(tlv: Tlv) -> bytes:
    if tlv.tag == 0x04:
        return tlv.value
    if tlv.tag == 0x24:  # constructed OCTET STRING
        return b"".join(_octets(child) for child in tlv.children())
    raise Pkcs7Error("expected an OCTET STRING")


def _signer(tlv: Tlv) -> SignerInfo:
    fields = tlv.children()
    if len(fields) < 5:
        raise Pkcs7Error("short SignerInfo")
    sid, digest_alg = fields[1], fields[2]
    serial = None
    if sid.tag == 0x30 and len(sid.children()) == 2:
        serial = int.from_bytes(sid.children()[1].value, "big", signed=True)
    rest = fields[3:]
    signed_attrs = message_digest = None
    if rest[0].tag == 0xA0:
        signed_attrs = b"\x31" + rest[0].raw[1:]
        for attribute in rest[0].children():
            oid, values = attribute.children()[:2]
            if decode_oid(oid) == OID_MESSAGE_DIGEST:
                message_digest = _octets(values.children()[0])
        rest = rest[1:]
    if len(rest) < 2:
        raise Pkcs7Error("SignerInfo has no signature")
    return SignerInfo(
        serial, decode_oid(digest_alg.children()[0]), signed_attrs, message_digest, _octets(rest[1])
    )


def parse_signed_data(der: bytes) -> SignedData:
    try:
        outer, end = read_tlv(der, 0)
        if end != len(der) or outer.tag != 0x30:
            raise Pkcs7Error("not a single DER SEQUENCE")
        oid, explicit = outer.children()[:2]
        if decode_oid(oid) != OID_SIGNED_DATA or explicit.tag != 0xA0:
            raise Pkcs7Error("not PKCS#7 SignedData")
        fields = explicit.children()[0].children()
        encap = fields[2].children()
        content = _octets(encap[1].children()[0]) if len(encap) > 1 else None
        certificates: list[x509.Certificate] = []
        signers: list[SignerInfo] = []
        for field in fields[3:]:
            if field.tag == 0xA0:
                certificates = [x509.load_der_x509_certificate(c.raw) for c in field.children()]
            elif field.tag == 0x31:
                signers = [_signer(s) for s in field.children()]
    except (IndexError, ValueError) as exc:
        raise Pkcs7Error(f"malformed PKCS#7: {exc}") from None
    if not signers:
        raise Pkcs7Error("PKCS#7 has no signer")
    return SignedData(content, certificates, signers)


def _verify(cert: x509.Certificate, signer: SignerInfo, content: bytes) -> bool:
    algorithm = HASHES.get(signer.digest_oid)
    if algorithm is None:
        return False
    covered = content
    if signer.signed_attrs is not None:
        digest = hashes.Hash(algorithm())
        digest.update(content)
        if signer.message_digest != digest.finalize():
            return False
        covered = signer.signed_attrs
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signer.signature, covered, padding.PKCS1v15(), algorithm())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signer.signature, covered, ec.ECDSA(algorithm()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def verify(
    signed: SignedData, content: bytes, candidates: list[x509.Certificate]
) -> x509.Certificate:
    """The candidate cert whose key made a valid signature over ``content``; Pkcs7Error if none."""
    for signer in signed.signers:
        for cert in candidates:
            if signer.serial is not None and cert.serial_number != signer.serial:
                continue
            if _verify(cert, signer, content):
                return cert
    raise Pkcs7Error("signature does not verify with any trusted certificate")
