"""Answers for names in the table, and templates from upstream replies (for the cache)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmagent.dns.table import HostRecord
from vmagent.dns.wire import (
    FLAG_AA,
    FLAG_QR,
    FLAG_TC,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    TYPE_A,
    TYPE_ANY,
    TYPE_CNAME,
    TYPE_OPT,
    TYPE_SOA,
    Query,
    Template,
    WireError,
    rr_fixed,
    skip_name,
)

# Istio rotates A/AAAA records between answers; vmagent pre-renders this many rotations.
MAX_ROTATIONS = 16
_QUESTION_POINTER = b"\xc0\x0c"


def table_templates(record: HostRecord, query: Query, ttl: int) -> list[Template]:
    """Answers for a table name, one per rotation of its addresses (Istio's lookupHost).

    The CNAME (search-domain expansion) is owned by the question; the addresses by the CNAME
    target when there is one, else by the question (also for wildcard matches). A name with no
    address of the asked family gets NOERROR with no records, CNAME omitted."""
    addresses = record.v4 if query.qtype == TYPE_A else record.v6
    rtype = query.qtype
    question = query.packet[12 : query.question_end]
    head = struct.pack("!HHHHHH", 0, FLAG_QR | FLAG_AA, 1, 0, 0, 0)
    prefix = bytearray(head + question)
    owner = _QUESTION_POINTER
    fixed: list[int] = []
    if addresses and record.cname is not None:
        target = record.cname
        target_offset = len(prefix) + 12
        fixed.append(len(prefix) + 6)
        prefix += _QUESTION_POINTER + rr_fixed(TYPE_CNAME, ttl, len(target)) + target
        owner = struct.pack("!H", 0xC000 | target_offset)
    n = len(addresses)
    rotations = min(n, MAX_ROTATIONS) or 1
    out = []
    for r in range(rotations):
        start = (r * n) // rotations
        body = bytearray(prefix)
        ends = [len(body)] if record.cname is not None and addresses else []
        offsets = list(fixed)
        for ip in addresses[start:] + addresses[:start]:
            offsets.append(len(body) + 6)
            body += owner + rr_fixed(rtype, ttl, len(ip)) + ip
            ends.append(len(body))
        out.append(
            Template(
                bytes(body), (len(ends), 0, 0), tuple(ends), tuple(offsets), (ttl,) * len(ends)
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """An upstream reply turned into a template, with what the cache needs to know."""

    template: Template
    rcode: int
    truncated: bool
    cache_ttl: int | None  # None: must not be cached (RFC 2308: no SOA, errors, truncation)
    negative: bool  # NXDOMAIN or NODATA (also behind a CNAME chain); capped as negative


_RR = struct.Struct("!HHIH")


def parse_upstream_reply(reply: bytes, sent: bytes) -> UpstreamReply | None:
    """Check ``reply`` answers ``sent`` (same ID and question; else None, to be ignored as
    spoofed or stale) and turn it into a template without its OPT record."""
    if len(reply) < 12 or reply[0:2] != sent[0:2]:
        return None
    flags, qd, an, ns, ar = struct.unpack_from("!HHHHH", reply, 2)
    question_end = len(sent) - 11  # sent = header + question + our 11-byte OPT
    if not flags & FLAG_QR or qd != 1 or reply[12:question_end].lower() != sent[12:question_end]:
        return None
    try:
        return _template_from_reply(reply, flags, (an, ns, ar), question_end)
    except (WireError, struct.error):
        return None


def _template_from_reply(
    reply: bytes, flags: int, counts: tuple[int, int, int], question_end: int
) -> UpstreamReply:
    an, ns, ar = counts
    qtype = struct.unpack_from("!H", reply, question_end - 4)[0]
    body = bytearray(reply[:question_end])
    body[0:2] = b"\x00\x00"
    ends: list[int] = []
    ttl_offsets: list[int] = []
    ttls: list[int] = []
    ext_rcode = 0
    answer_ttl: int | None = None
    answered = False  # a record of the asked type (or any record for ANY) in the answer
    soa_ttl: int | None = None
    off = question_end
    kept_ar = 0
    for index in range(an + ns + ar):
        start = off
        name_end = skip_name(reply, off)
        rtype, _, ttl, rdlength = _RR.unpack_from(reply, name_end)
        off = name_end + 10 + rdlength
        if off > len(reply):
            raise WireError("truncated record")
        if rtype == TYPE_OPT:
            ext_rcode = (ttl >> 24) & 0xFF
            continue
        ttl &= 0x7FFFFFFF  # RFC 2181 8: a TTL with the top bit set means zero
        ttl_offsets.append(len(body) + (name_end - start) + 4)
        ttls.append(ttl)
        body += reply[start:off]
        ends.append(len(body))
        if index < an:
            answer_ttl = ttl if answer_ttl is None else min(answer_ttl, ttl)
            answered = answered or rtype == qtype or qtype == TYPE_ANY
        elif index < an + ns:
            if rtype == TYPE_SOA and rdlength >= 20:
                minimum = struct.unpack_from("!I", reply, off - 4)[0]
                soa_ttl = min(ttl, minimum)
        else:
            kept_ar += 1
    if off != len(reply):
        raise WireError("trailing bytes")
    struct.pack_into("!HHH", body, 6, an, ns, kept_ar)
    rcode = (ext_rcode << 4) | (flags & 0xF)
    truncated = bool(flags & FLAG_TC)
    negative = rcode == RCODE_NXDOMAIN or (rcode == RCODE_NOERROR and not answered)
    cache_ttl = None if truncated else _cache_ttl(rcode, negative, answer_ttl, soa_ttl)
    template = Template(
        bytes(body), (an, ns, kept_ar), tuple(ends), tuple(ttl_offsets), tuple(ttls)
    )
    return UpstreamReply(template, rcode, truncated, cache_ttl, negative)


def _cache_ttl(
    rcode: int, negative: bool, answer_ttl: int | None, soa_ttl: int | None
) -> int | None:
    """Seconds a reply may be cached (before the cache's caps), None for never.

    Positive: the smallest answer TTL. Negative (RFC 2308 5): min(SOA TTL, SOA MINIMUM), and
    never longer than a CNAME chain in front of it (its records go out with the reply). A
    NODATA behind a CNAME chain (RFC 2308 2.2: the chain ends without the asked type) without
    an SOA: the chain's TTL, which the cache caps at its negative TTL (the configured
    default, ``VMAGENT_DNS_CACHE_NEGATIVE_TTL``), so it is never cached as long as a positive
    answer (c-ares/c-ares#1293). Other negative answers without an SOA, and errors: None."""
    if not negative:
        return answer_ttl if rcode == RCODE_NOERROR else None
    if soa_ttl is not None:
        return soa_ttl if answer_ttl is None else min(soa_ttl, answer_ttl)
    if rcode == RCODE_NOERROR and answer_ttl is not None:
        return answer_ttl
    return None
