"""The answer cache: TTL countdown, RFC 2308 negative caching, RFC 8767 serve-stale, LRU
bounded by entries and bytes. Time is passed in (monotonic seconds)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from vmagent.dns.answers import UpstreamReply
from vmagent.dns.wire import Template, cap_ttls

# RFC 8767 4: stale answers go out with a TTL of 30 seconds.
STALE_TTL = 30
_ENTRY_OVERHEAD = 200  # rough per-entry bookkeeping, so tiny answers still count


@dataclass(frozen=True, slots=True)
class CacheLimits:
    max_entries: int = 10000
    max_bytes: int = 16 << 20
    max_ttl: int = 300
    max_negative_ttl: int = 60
    stale_seconds: int = 3600


@dataclass(frozen=True, slots=True)
class CacheEntry:
    template: Template
    stored_at: float
    expires_at: float
    negative: bool
    # Remembered replies made from this entry (objects with ``valid_until``), voided when the
    # entry leaves the cache so an evicted answer is not served on from elsewhere.
    dependents: list[Any] = field(default_factory=list, compare=False)

    def age(self, now: float) -> int:
        return int(now - self.stored_at)

    def fresh_until(self, now: float) -> float:
        """Until when a reply rendered now stays byte-identical (TTLs tick each second)."""
        return min(self.expires_at, self.stored_at + self.age(now) + 1)


class DnsCache:
    def __init__(self, limits: CacheLimits) -> None:
        self.limits = limits
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        """A fresh entry, or None (an expired one stays for serve-stale)."""
        entry = self._entries.get(key)
        if entry is None or now >= entry.expires_at:
            return None
        self._entries.move_to_end(key)
        return entry

    def get_stale(self, key: bytes, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None or now >= entry.expires_at + self.limits.stale_seconds:
            return None
        return entry

    def put(self, key: bytes, reply: UpstreamReply, now: float) -> CacheEntry | None:
        ttl = reply.cache_ttl
        if ttl is None:
            return None
        cap = self.limits.max_negative_ttl if reply.negative else self.limits.max_ttl
        ttl = min(ttl, cap)
        if ttl <= 0 or self.limits.max_entries == 0:
            return None
        entry = CacheEntry(cap_ttls(reply.template, ttl), now, now + ttl, reply.negative)
        self._discard(key)
        self._entries[key] = entry
        self._bytes += _cost(entry)
        self._evict()
        return entry

    def _discard(self, key: bytes) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= _cost(old)
            _void(old)

    def _evict(self) -> None:
        """Drop least recently used entries. Hits answered from remembered replies never
        touch this dict, so an entry whose replies were hit since it was last looked at gets
        a second chance (the CLOCK approximation of LRU)."""
        limits = self.limits
        entries = self._entries
        chances = len(entries)
        while len(entries) > limits.max_entries or self._bytes > limits.max_bytes:
            key, old = entries.popitem(last=False)
            if chances > 0 and any(d.hits for d in old.dependents):
                chances -= 1
                for dependent in old.dependents:
                    dependent.hits = 0
                entries[key] = old
                continue
            self._bytes -= _cost(old)
            _void(old)

    def clear(self) -> None:
        for entry in self._entries.values():
            _void(entry)
        self._entries.clear()
        self._bytes = 0


def _void(entry: CacheEntry) -> None:
    for dependent in entry.dependents:
        dependent.valid_until = 0.0
    entry.dependents.clear()


def _cost(entry: CacheEntry) -> int:
    return len(entry.template.body) + _ENTRY_OVERHEAD
