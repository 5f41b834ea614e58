"""Byte-level DNS message handling for the hot path (RFC 1035, RFC 6891).

Nothing here builds per-record objects: queries are parsed into offsets into the packet, and
answers are templates (bytes plus record boundaries and TTL offsets) finished per query by
patching the ID, the question and the TTLs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

TYPE_A = 1
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_ANY = 255
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
EXT_RCODE_BADVERS = 16

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_CD = 0x0010
OPCODE_MASK = 0x7800
EDNS_DO = 0x8000

# The payload size vmagent advertises, to clients and upstreams (DNS Flag Day 2020 value:
# avoids IP fragmentation; anything larger travels over TCP).
EDNS_PAYLOAD = 1232
MAX_UDP_PAYLOAD = 65535

_HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength


class WireError(ValueError):
    """The bytes are not a well-formed DNS message."""


class BadQuery(Exception):
    """A query that gets an error reply (FORMERR, NOTIMP, BADVERS) rather than an answer."""

    def __init__(self, rcode: int, question_end: int | None = None) -> None:
        super().__init__(rcode)
        self.rcode = rcode
        self.question_end = question_end


def skip_name(msg: bytes, off: int) -> int:
    """Offset just past the (possibly compressed) name at ``off``."""
    end = len(msg)
    while True:
        if off >= end:
            raise WireError("name runs past the end of the message")
        length = msg[off]
        if length == 0:
            return off + 1
        if length >= 0xC0:
            if off + 1 >= end:
                raise WireError("truncated compression pointer")
            return off + 2
        if length > 63:
            raise WireError("bad label type")
        off += 1 + length


def question_name_end(msg: bytes, off: int) -> int:
    """Offset past an uncompressed question name, checking RFC 1035 length limits."""
    start, end = off, len(msg)
    while True:
        if off >= end:
            raise WireError("question name runs past the end")
        length = msg[off]
        if length == 0:
            off += 1
            if off - start > 255:
                raise WireError("name longer than 255 bytes")
            return off
        if length > 63:
            raise WireError("compressed or bad label in question")
        off += 1 + length


@dataclass(slots=True)
class Query:
    """A parsed query: offsets into ``packet`` plus the few header fields answers depend on."""

    packet: bytes
    flags: int
    name_end: int
    question_end: int
    qtype: int
    qclass: int
    edns: bool
    udp_size: int
    do: bool

    @property
    def name(self) -> bytes:
        """The question name in lower-case wire form, the lookup key for table and cache."""
        return self.packet[12 : self.name_end].lower()

    @property
    def key(self) -> bytes:
        """Cache and coalescing key: name, type, class, then one byte of the bits that change
        what the upstream answers: 1 = DNSSEC OK (with/without DNSSEC records), 2 = Checking
        Disabled (RFC 4035 3.2.2: an answer fetched with CD=1 may be bogus and must not reach a
        CD=0 client; coredns/coredns#6186). ``key[:-1]`` is the question as sent upstream."""
        tail = self.packet[self.name_end : self.question_end]
        bits = (1 if self.do else 0) | (2 if self.flags & FLAG_CD else 0)
        return self.name + tail + bytes((bits,))


def parse_query(packet: bytes) -> Query | None:
    """Parse a query. None: drop silently (no header, or a response). BadQuery: error reply."""
    if len(packet) < 12:
        return None
    _, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(packet)
    if flags & FLAG_QR:
        return None
    if flags & OPCODE_MASK:
        raise BadQuery(RCODE_NOTIMP)
    if qdcount != 1:
        raise BadQuery(RCODE_FORMERR)
    try:
        name_end = question_name_end(packet, 12)
        question_end = name_end + 4
        if question_end > len(packet):
            raise WireError("truncated question")
        qtype, qclass = struct.unpack_from("!HH", packet, name_end)
        off = question_end
        for _ in range(ancount + nscount):
            off = _skip_record(packet, off)
        edns, udp_size, do, version = False, 512, False, 0
        for _ in range(arcount):
            rr_start = off
            off = _skip_record(packet, off)
            name_off = rr_start
            rtype = _U16.unpack_from(packet, skip_name(packet, name_off))[0]
            if rtype == TYPE_OPT:
                if edns or packet[rr_start] != 0:
                    raise WireError("more than one OPT record, or OPT not at the root")
                _, size, ttl, _ = _RR_FIXED.unpack_from(packet, rr_start + 1)
                edns, udp_size = True, max(512, size)
                version, do = (ttl >> 16) & 0xFF, bool(ttl & EDNS_DO)
        if off != len(packet):
            raise WireError("trailing bytes after the last record")
    except (WireError, struct.error):
        raise BadQuery(RCODE_FORMERR) from None
    if version != 0:
        raise BadQuery(EXT_RCODE_BADVERS, question_end)
    return Query(packet, flags, name_end, question_end, qtype, qclass, edns, udp_size, do)


def _skip_record(msg: bytes, off: int) -> int:
    off = skip_name(msg, off)
    if off + 10 > len(msg):
        raise WireError("truncated record header")
    rdlength = _U16.unpack_from(msg, off + 8)[0]
    off += 10 + rdlength
    if off > len(msg):
        raise WireError("truncated record data")
    return off


def opt_record(do: bool, ext_rcode: int = 0) -> bytes:
    """vmagent's own OPT RR: root owner, our payload size, the client's DO bit."""
    ttl = (ext_rcode << 24) | (EDNS_DO if do else 0)
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, EDNS_PAYLOAD, ttl, 0)


def error_reply(
    packet: bytes, rcode: int, question_end: int | None = None, edns: bool = False, do: bool = False
) -> bytes:
    """Header-only (or header+question) reply carrying ``rcode``; ID, opcode, RD and CD echoed
    (RFC 1035 4.1.1, RFC 4035 3.2.2), RA set (vmagent offers recursion: it forwards; without
    RA dig warns "recursion requested but not available"), OPT included when the query had
    one (RFC 6891 7) or the rcode needs the extended bits. Table answers keep RA clear and
    forwarded ones the upstream's bits, both as Istio's agent (reference 3.4)."""
    qid, flags = struct.unpack_from("!HH", packet)
    echoed = flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)
    reply_flags = FLAG_QR | FLAG_RA | echoed | (rcode & 0xF)
    if question_end is None:
        return _HEADER.pack(qid, reply_flags, 0, 0, 0, 0)
    question = packet[12:question_end]
    extra = opt_record(do, rcode >> 4) if edns or rcode > 15 else b""
    return _HEADER.pack(qid, reply_flags, 1, 0, 0, 1 if extra else 0) + question + extra


@dataclass(slots=True, frozen=True)
class Template:
    """An answer waiting for a query: header (ID 0) + question + records, without OPT.

    ``record_ends`` are the end offsets of the records in order (for truncation);
    ``ttl_offsets``/``ttls`` locate the TTL fields and their original values (for countdown)."""

    body: bytes
    counts: tuple[int, int, int]
    record_ends: tuple[int, ...]
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]


def finish(
    template: Template, query: Query, limit: int, ttl_age: int = 0, ttl_override: int | None = None
) -> bytes:
    """The reply to ``query``: its ID, RD/CD bits and exact question bytes, TTLs reduced by
    ``ttl_age`` (or all set to ``ttl_override``), OPT if the query had one, truncated to
    ``limit`` bytes with TC=1 when whole records had to be dropped."""
    body = bytearray(template.body)
    packet = query.packet
    body[0:2] = packet[0:2]
    flags = _U16.unpack_from(body, 2)[0]
    flags = (flags & ~(FLAG_RD | FLAG_CD)) | (query.flags & (FLAG_RD | FLAG_CD))
    body[12 : query.question_end] = packet[12 : query.question_end]
    if ttl_override is not None or ttl_age:
        pack_into = _TTL.pack_into
        for off, ttl in zip(template.ttl_offsets, template.ttls):
            pack_into(
                body, off, ttl_override if ttl_override is not None else max(0, ttl - ttl_age)
            )
    opt = opt_record(query.do) if query.edns else b""
    an, ns, ar = template.counts
    if len(body) + len(opt) > limit:
        room = limit - len(opt)
        kept = 0
        for end in template.record_ends:
            if end > room:
                break
            kept += 1
        cut = template.record_ends[kept - 1] if kept else query.question_end
        del body[cut:]
        an_kept = min(kept, an)
        ns_kept = min(kept - an_kept, ns)
        an, ns, ar = an_kept, ns_kept, kept - an_kept - ns_kept
        flags |= FLAG_TC
    _COUNTS_FLAGS.pack_into(body, 2, flags, 1, an, ns, ar + (1 if opt else 0))
    return bytes(body + opt) if opt else bytes(body)


def cap_ttls(template: Template, cap: int) -> Template:
    """The template with every TTL at most ``cap`` (what a cache keeping it ``cap`` seconds
    may promise its clients)."""
    if all(ttl <= cap for ttl in template.ttls):
        return template
    body = bytearray(template.body)
    ttls = tuple(min(ttl, cap) for ttl in template.ttls)
    for off, ttl in zip(template.ttl_offsets, ttls):
        _TTL.pack_into(body, off, ttl)
    return Template(bytes(body), template.counts, template.record_ends, template.ttl_offsets, ttls)


_TTL = struct.Struct("!I")
_COUNTS_FLAGS = struct.Struct("!HHHHH")


def reply_limit(query: Query, tcp: bool) -> int:
    return MAX_UDP_PAYLOAD if tcp else query.udp_size


def encode_name(name: str) -> bytes:
    """Dotted name (trailing dot optional) to lower-case wire form."""
    labels = [label for label in name.lower().rstrip(".").split(".")] if name.strip(".") else []
    out = bytearray()
    for label in labels:
        raw = label.encode("idna") if not label.isascii() else label.encode("ascii")
        if not raw or len(raw) > 63:
            raise WireError(f"bad label {label!r} in {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise WireError(f"name longer than 255 bytes: {name!r}")
    return bytes(out)


def decode_name(wire: bytes) -> str:
    """Uncompressed wire name to dotted text with a trailing dot (for logs and debugging)."""
    labels, off = [], 0
    while off < len(wire) and wire[off]:
        length = wire[off]
        labels.append(wire[off + 1 : off + 1 + length].decode("ascii", "backslashreplace"))
        off += 1 + length
    return ".".join(labels) + "."


def header(qid_flags: int, counts: tuple[int, int, int, int]) -> bytes:
    return _HEADER.pack(0, qid_flags, *counts)


def rr_fixed(rtype: int, ttl: int, rdlength: int) -> bytes:
    return _RR_FIXED.pack(rtype, CLASS_IN, ttl, rdlength)
