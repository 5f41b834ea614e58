"""The DNS proxy's pure core: query in, answer (or a decision to forward) out.

No sockets, no clock: the shell passes ``now`` (monotonic seconds). Hits are remembered in
``fast`` (UDP) and ``fast_tcp`` (TCP: no truncation, so other bytes), dicts from the query bytes
after the ID to the finished reply bytes after the ID, so repeated queries are answered with one
dict lookup and no parsing, and a name's rotated address orders take turns on both transports."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmagent.dns.answers import UpstreamReply, table_templates
from vmagent.dns.cache import STALE_TTL, CacheEntry, CacheLimits, DnsCache
from vmagent.dns.table import Lookup
from vmagent.dns.wire import (
    CLASS_IN,
    FLAG_CD,
    FLAG_RD,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    BadQuery,
    Query,
    Template,
    error_reply,
    finish,
    opt_record,
    parse_query,
    reply_limit,
)

TABLE, CACHE, UPSTREAM, STALE, ERROR = range(5)
OUTCOMES = ("table", "cache", "upstream", "stale", "error")
LATENCY_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FAST_MAX_ENTRIES = 1 << 16


@dataclass
class DnsCounters:
    """Counters for export: queries by outcome, upstream failures, upstream latency."""

    queries: list[int] = field(default_factory=lambda: [0] * len(OUTCOMES))
    dropped: int = 0
    upstream_failures: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    latency_sum: float = 0.0
    table_names: int = 0
    table_entries: int = 0
    last_table_update: float | None = None  # wall-clock seconds, as passed in

    def observe_upstream(self, seconds: float) -> None:
        index = 0
        while index < len(LATENCY_BOUNDS) and seconds > LATENCY_BOUNDS[index]:
            index += 1
        self.latency_buckets[index] += 1
        self.latency_sum += seconds

    def snapshot(self) -> dict[str, object]:
        return {
            "queries": dict(zip(OUTCOMES, self.queries)),
            "dropped": self.dropped,
            "upstream_failures": self.upstream_failures,
            "upstream_latency": {
                "buckets": dict(zip([*map(str, LATENCY_BOUNDS), "+Inf"], self.latency_buckets)),
                "sum": self.latency_sum,
            },
            "table_names": self.table_names,
            "table_entries": self.table_entries,
            "last_table_update": self.last_table_update,
        }


class FastEntry:
    """Finished replies (minus the ID) for one exact query; several when addresses rotate."""

    __slots__ = ("hits", "outcome", "turn", "valid_until", "variants")

    def __init__(self, variants: list[bytes], valid_until: float, outcome: int) -> None:
        self.variants = variants
        self.valid_until = valid_until
        self.outcome = outcome
        self.turn = 0
        self.hits = 0  # read by the cache's eviction (CLOCK): a hit entry gets a second chance

    def next_reply(self) -> bytes:
        variants = self.variants
        if len(variants) == 1:
            return variants[0]
        self.turn += 1
        return variants[self.turn % len(variants)]


@dataclass(frozen=True, slots=True)
class Forward:
    """The query must go upstream; ``key`` groups identical questions into one request."""

    query: Query
    key: bytes
    cacheable: bool


@dataclass(frozen=True, slots=True)
class Resolution:
    """What the upstream exchange produced for one key, rendered for each waiting client."""

    template: Template | None
    entry: CacheEntry | None
    outcome: int
    ttl_override: int | None = None


class DnsCore:
    def __init__(self, ttl: int = 30, cache_limits: CacheLimits | None = None) -> None:
        self.ttl = ttl
        self.lookup: Lookup | None = None
        self.cache = DnsCache(cache_limits or CacheLimits())
        self.counters = DnsCounters()
        self.fast: dict[bytes, FastEntry] = {}  # UDP; read directly by the socket shell
        self.fast_tcp: dict[bytes, FastEntry] = {}
        self._rotation = 0  # which address order the next freshly built table answer uses

    @property
    def ready(self) -> bool:
        return self.lookup is not None

    def set_lookup(self, lookup: Lookup, wall_now: float) -> None:
        """Swap in a new table (built elsewhere); remembered replies are dropped with the old."""
        self.lookup = lookup
        self.fast = {}
        self.fast_tcp = {}
        self.counters.table_names = len(lookup.hosts)
        self.counters.table_entries = lookup.entries
        self.counters.last_table_update = wall_now

    def handle(self, packet: bytes, now: float, tcp: bool) -> bytes | Forward | None:
        """Answer from the table or the cache, or say to forward; None means drop."""
        packet = bytes(packet)  # callers may hand in a bytearray or memoryview
        if tcp:
            # UDP hits never get here (the shell looks them up itself); TCP ones do.
            hit = self.fast_tcp.get(packet[2:])
            if hit is not None and hit.valid_until > now:
                self.counters.queries[hit.outcome] += 1
                hit.hits += 1
                return packet[:2] + hit.next_reply()
        try:
            query = parse_query(packet)
        except BadQuery as bad:
            self.counters.queries[ERROR] += 1
            return error_reply(packet, bad.rcode, bad.question_end)
        if query is None:
            self.counters.dropped += 1
            return None
        limit = reply_limit(query, tcp)
        in_table = False
        lookup = self.lookup
        if lookup is not None and query.qclass == CLASS_IN:
            record = lookup.find(query.name)
            if record is not None:
                in_table = True
                if query.qtype == TYPE_A or query.qtype == TYPE_AAAA:
                    templates = table_templates(record, query, self.ttl)
                    replies = [finish(t, query, limit) for t in templates]
                    # Istio's roundRobinResponse, on both transports: a fresh answer starts at
                    # the next rotation (queries that differ in ID only continue it through
                    # the remembered entry; others, e.g. dig's random cookie, through this
                    # counter), so no client sees one fixed order.
                    turn = self._rotation % len(replies)
                    self._rotation += 1
                    fast = self._remember(packet, replies, float("inf"), TABLE, tcp)
                    fast.turn = turn
                    self.counters.queries[TABLE] += 1
                    return replies[turn]
        key = query.key
        if not in_table:
            entry = self.cache.get(key, now)
            if entry is not None:
                reply = finish(entry.template, query, limit, ttl_age=entry.age(now))
                fast = self._remember(packet, [reply], entry.fresh_until(now), CACHE, tcp)
                _depend(entry, fast, now)
                self.counters.queries[CACHE] += 1
                return reply
        return Forward(query, key, cacheable=not in_table)

    def _remember(
        self, packet: bytes, replies: list[bytes], valid_until: float, kind: int, tcp: bool
    ) -> FastEntry:
        fast = self.fast_tcp if tcp else self.fast
        if len(fast) >= FAST_MAX_ENTRIES:
            fast = {}
            if tcp:
                self.fast_tcp = fast
            else:
                self.fast = fast
        entry = fast[packet[2:]] = FastEntry([r[2:] for r in replies], valid_until, kind)
        return entry

    @staticmethod
    def upstream_query(forward: Forward, qid: int) -> bytes:
        """The query vmagent sends upstream: fresh ID, RD, lower-cased question, EDNS with
        vmagent's payload size (istio/istio#61371: never the 512-byte default)."""
        query = forward.query
        flags = FLAG_RD | (query.flags & FLAG_CD)
        head = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1)
        return head + forward.key[:-1] + opt_record(query.do)

    def complete(self, forward: Forward, reply: UpstreamReply | None, now: float) -> Resolution:
        """Record the outcome of one upstream exchange (None: every upstream failed)."""
        if reply is not None:
            entry = self.cache.put(forward.key, reply, now) if forward.cacheable else None
            template = entry.template if entry is not None else reply.template
            return Resolution(template, entry, UPSTREAM)
        self.counters.upstream_failures += 1
        stale = self.cache.get_stale(forward.key, now) if forward.cacheable else None
        if stale is not None:
            return Resolution(stale.template, None, STALE, ttl_override=STALE_TTL)
        return Resolution(None, None, ERROR)

    def render(self, resolution: Resolution, query: Query, now: float, tcp: bool) -> bytes:
        """The reply for one client waiting on ``resolution``."""
        self.counters.queries[resolution.outcome] += 1
        if resolution.template is None:
            return error_reply(
                query.packet, RCODE_SERVFAIL, query.question_end, query.edns, query.do
            )
        limit = reply_limit(query, tcp)
        reply = finish(resolution.template, query, limit, ttl_override=resolution.ttl_override)
        entry = resolution.entry
        if entry is not None:
            fast = self._remember(query.packet, [reply], entry.fresh_until(now), CACHE, tcp)
            _depend(entry, fast, now)
        return reply


def _depend(entry: CacheEntry, fast: FastEntry, now: float) -> None:
    """Tie a remembered reply to its cache entry (dropping ties that have lapsed anyway)."""
    entry.dependents[:] = [d for d in entry.dependents if d.valid_until > now]
    entry.dependents.append(fast)
