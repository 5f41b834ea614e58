"""The DNS proxy as a service of the agent: config in, listeners up, tables swapped in.

A table swap must not stall queries (issue 7 §5: 100k services, 600k names, no query waiting
more than 50 ms, RSS under 150 MB). A reloaded table file is built by a child process
(:mod:`vmagent.dns.tablebuild`), which hands back a lookup of a few flat buffers: no per-name
work and no heap growth here; so is a table pushed over NDS, from its protobuf bytes (which the
proxy keeps, ~80 bytes per entry, instead of per-entry objects). A table handed over as objects
is built on the event loop's thread a slice at a time (:func:`run_in_slices`), answering
queries between slices. Not on a
worker thread: it would hold the GIL, and the loop, which gives the GIL up at every socket
call, would wait a switch interval (5 ms) to get it back each time (~100 ms per query at 1000
queries/s, measured). After a swap the live objects are frozen out of the garbage collector's
passes (``gc.freeze``) and the C heap's free pages go back to the system (``malloc_trim``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

from vmagent.config import Config
from vmagent.dns import upstream
from vmagent.dns.answers import UpstreamReply
from vmagent.dns.cache import CacheLimits
from vmagent.dns.core import DnsCore
from vmagent.dns.resolvconf import (
    Address,
    ResolvConf,
    listen_addresses,
    parse_host_port,
    parse_resolv_conf,
)
from vmagent.dns.server import DnsServer, TcpLimits
from vmagent.dns.steps import Steps, T, take_apart
from vmagent.dns.table import (
    Lookup,
    NameInfo,
    NameTableError,
    TableScope,
    build_lookup,
    build_lookup_steps,
)
from vmagent.dns.tablebuild import (
    BuilderFailed,
    build_in_child,
    build_nds_in_child,
    nds_json_chunks,
    read_table_file,
    table_json,
    write_table_json,
)

log = logging.getLogger("vmagent.dns")

# Longest run of table work between two turns of the event loop.
SLICE_SECONDS = 0.002

# Gets a table again (e.g. re-reads its file), for proxies that do not keep it.
TableSource = Callable[[], Awaitable[Mapping[str, NameInfo]]]


async def run_in_slices(steps: Steps[T], budget: float = SLICE_SECONDS) -> T:
    """Drive a stepwise computation (a generator that yields between small steps) on the
    event loop's thread, letting the loop run (answer queries) every ``budget`` seconds."""
    deadline = time.monotonic() + budget
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: T = done.value
            return result
        if time.monotonic() >= deadline:
            await asyncio.sleep(0)
            deadline = time.monotonic() + budget


class DnsProxy:
    """Owns the core and the server; the table comes from a file or from the control plane."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.core = DnsCore(
            ttl=config.vmagent_dns_ttl,
            cache_limits=CacheLimits(
                max_entries=config.vmagent_dns_cache_entries,
                max_bytes=config.vmagent_dns_cache_bytes,
                max_ttl=config.vmagent_dns_cache_max_ttl,
                max_negative_ttl=config.vmagent_dns_cache_negative_ttl,
                stale_seconds=config.vmagent_dns_stale_seconds,
            ),
        )
        self.server = DnsServer(
            self.core,
            self._resolve,
            TcpLimits(
                idle_timeout=config.vmagent_dns_tcp_idle_timeout,
                max_connections=config.vmagent_dns_tcp_max_connections,
            ),
        )
        self.upstreams: tuple[Address, ...] = ()
        self.search: tuple[str, ...] = ()
        self._table: Mapping[str, NameInfo] | None = None
        self._source: TableSource | None = None
        self._file: str | None = None  # a table file the proxy builds from in a child
        self._nds: bytes | None = None  # a pushed NameTable (serialized), built in a child
        self._builds = 0
        self._resolv_seen: tuple[int, int, int] | None = None

    @property
    def ready(self) -> bool:
        return self.core.ready

    @property
    def not_ready_reason(self) -> str | None:
        return None if self.core.ready else "name table not loaded"

    async def start(self) -> None:
        """Read resolv.conf and bind every listen address (raises ValueError/OSError)."""
        config = self.config
        addresses = listen_addresses(config.dns_proxy_addr, config.vmagent_dns_allow_non_loopback)
        implicit_v6 = "localhost" in " ".join(config.dns_proxy_addr)
        for address in addresses:
            try:
                await self.server.listen(address)
            except OSError as exc:
                if implicit_v6 and address[0] == "::1":
                    log.warning("dns: not listening on [::1]:%d: %s", address[1], exc)
                    continue
                raise OSError(
                    exc.errno, f"cannot listen on {address[0]} port {address[1]}: {exc.strerror}"
                ) from None
        self._read_resolv_conf()  # after binding, so our own addresses are never upstreams
        fix_mmap_threshold()

    async def close(self) -> None:
        await self.server.close()

    async def update_table(
        self, table: Mapping[str, NameInfo], source: TableSource | None = None
    ) -> None:
        """Build the lookup (in slices, answering queries meanwhile) and swap it in whole.

        With ``source`` the table is handed over, not kept: emptied once the lookup is built
        (a slice at a time; freeing 100k entries at once takes ~15 ms), and a search-list
        change gets it from ``source`` again (a table file is re-read). That saves its memory,
        ~50 MB at 100k entries. Without ``source`` it is kept, unchanged."""
        self._table, self._source = (None if source else table), source
        self._file = self._nds = None
        await self._build(table, owned=source is not None)

    async def update_from_nds(self, data: bytes, persist: str | None = None) -> None:
        """Swap in the table of the serialized NameTable ``data`` (an NDS push), decoded,
        checked and expanded by a child process (:func:`~vmagent.dns.tablebuild.
        build_nds_in_child`): the agent's process keeps only ``data`` and the lookup's few
        buffers, and its event loop does no per-entry work (issue 7 §5). ``persist``: a file
        the child then writes the table to as JSON. NameTableError if the table cannot be
        used (the current one stays). Where no child can run, it is decoded on a worker
        thread and built here, in slices."""
        self._builds += 1
        build = self._builds

        def install(lookup: Lookup) -> None:
            if build == self._builds:  # else a newer table (or search list) came meanwhile
                self._table, self._source, self._file, self._nds = None, None, None, data
                self._install(lookup)

        try:
            await build_nds_in_child(data, self._scope(), install, persist)
            return
        except BuilderFailed as exc:
            log.warning("dns: %s; building the name table in this process", exc)
        from vmagent.dns.ndstable import parse_nds

        table = await asyncio.to_thread(parse_nds, data)
        await self._build(table, owned=False)
        self._table, self._source, self._file, self._nds = None, None, None, data
        if persist is not None:
            try:
                await asyncio.to_thread(write_table_json, persist, table)
            except OSError as exc:
                log.warning("dns: cannot persist the name table to %s: %s", persist, exc)

    async def table_document(self) -> AsyncGenerator[bytes, None]:
        """The current table as its JSON document (``/debug/ndsz``), in pieces, rendered off
        the event loop: by a child from a pushed table, read from a table file, else (small
        tables handed over in-process) on a worker thread. ``{"table": {}}`` before any."""
        if self._nds is not None:
            try:
                async for chunk in nds_json_chunks(self._nds):
                    yield chunk
            except BuilderFailed as exc:
                log.warning("dns: %s", exc)
            return
        if self._file is not None:
            try:
                handle = await asyncio.to_thread(open, self._file, "rb")
            except OSError as exc:
                log.warning("dns: cannot read %s: %s", self._file, exc)
            else:
                with handle:
                    while chunk := await asyncio.to_thread(handle.read, 1 << 16):
                        yield chunk
                return
        table = self._table
        if table is None and self._source is not None:
            table = await self._source()
        yield await asyncio.to_thread(table_json, table or {})

    async def update_from_file(
        self, path: str, source: TableSource, at_start: bool = False
    ) -> None:
        """Swap in the table of the file ``path``, built by a child process
        (:mod:`vmagent.dns.tablebuild`: no work on this process's event loop, no heap growth
        here); NameTableError if the table cannot be used (the current one stays). Where no
        child can run, ``source`` gives the table and it is built here, in slices.

        ``at_start``: the first table, before any query was answered: built here at once, so
        the queries that arrive meanwhile wait in the socket buffers and get the table's
        answers, not the upstream's (and no concurrent allocations fragment the heap)."""
        self._builds += 1
        build = self._builds
        try:
            if at_start:
                lookup = build_lookup(read_table_file(path), self._scope())
            else:
                lookup = await build_in_child(path, self._scope())
        except BuilderFailed as exc:
            log.warning("dns: %s; building the name table in this process", exc)
            await self.update_table(await source(), source)
            return
        self._table, self._source, self._file, self._nds = None, source, path, None
        if build == self._builds:
            self._install(lookup)

    async def _rebuild(self) -> None:
        if self._table is not None:
            await self._build(self._table, owned=False)
            return
        try:
            if self._nds is not None:
                await self.update_from_nds(self._nds)
            elif self._file is not None and self._source is not None:
                await self.update_from_file(self._file, self._source)
            elif self._source is not None:
                await self._build(await self._source(), owned=True)
        except NameTableError as exc:
            log.error("dns: keeping the name table for the previous search list: %s", exc)

    def _scope(self) -> TableScope:
        return TableScope(
            namespace=self.config.namespace,
            cluster_domain=self.config.vmagent_cluster_domain,
            search=self.search,
        )

    async def _build(self, table: Mapping[str, NameInfo], owned: bool) -> None:
        self._builds += 1
        build = self._builds
        lookup = await run_in_slices(build_lookup_steps(table, self._scope()))
        if owned and isinstance(table, dict):
            await run_in_slices(take_apart(table))
        if build == self._builds:  # else a newer table (or search list) came meanwhile
            self._install(lookup)

    def _install(self, lookup: Lookup) -> None:
        self.core.set_lookup(lookup, time.time())  # the old one: a few buffers, freed at once
        log.info(
            "dns: name table loaded: %d entries, %d names answered",
            lookup.entries,
            lookup.size,
        )
        # Everything alive now (the lookup, a kept table, the imported modules) stays alive
        # for long: moved to the permanent generation, no collection walks it again. Tables
        # hold no reference cycles, so when one is replaced reference counting frees it.
        gc.freeze()
        give_back_free_memory()

    async def watch_resolv_conf(self, interval: float = 1.0) -> None:
        """Pick up resolv.conf changes (upstreams, search list) without a restart."""
        while True:
            await asyncio.sleep(interval)
            old_search = self.search
            if self._read_resolv_conf() and self.search != old_search:
                await self._rebuild()

    def _read_resolv_conf(self) -> bool:
        config = self.config
        path = config.vmagent_resolv_conf
        try:
            st = os.stat(path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            signature = None
        if signature == self._resolv_seen and self.upstreams:
            return False
        self._resolv_seen = signature
        resolv = ResolvConf()
        if signature is not None:
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    resolv = parse_resolv_conf(handle.read())
            except OSError as exc:
                log.warning("dns: cannot read %s: %s", path, exc)
        if config.vmagent_dns_upstreams:
            servers = [parse_host_port(s, 53) for s in config.vmagent_dns_upstreams]
        else:
            servers = [(ns.split("%", 1)[0], 53) for ns in resolv.nameservers]
        ours = set(self.server.addresses)
        self.upstreams = tuple(s for s in servers if s not in ours)
        self.search = config.vmagent_dns_search or resolv.search
        if not self.upstreams:
            log.warning("dns: no upstream servers (from %s or --upstream)", path)
        else:
            log.info(
                "dns: upstreams %s, search %s",
                ", ".join(f"{h}:{p}" for h, p in self.upstreams),
                " ".join(self.search) or "(none)",
            )
        return True

    async def _resolve(self, sent: bytes) -> UpstreamReply | None:
        config = self.config
        return await upstream.resolve(
            self.upstreams,
            sent,
            parallel=config.dns_forward_parallel,
            attempt_timeout=config.vmagent_dns_attempt_timeout,
            total_timeout=config.dns_forward_timeout,
        )


# glibc mallopt parameter (malloc.h): allocations of at least this many bytes get their own
# mmap, returned to the system when freed.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 * 1024


def fix_mmap_threshold() -> None:
    """Keep big buffers (a pushed table's bytes, the lookup's buffers, the builder's answer:
    MBs each) out of the heap. glibc raises its mmap threshold to the size of each big block
    freed (up to 32 MiB), so after the first swap such buffers came from the heap, fragmented
    it, and stayed in RSS: +30 MB after one 100k-entry push, measured. Setting the threshold
    fixes it. No-op where the C library has no mallopt."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def give_back_free_memory() -> None:
    """Return the C heap's free pages to the system. glibc keeps them after a table swap's
    big temporary allocations (its mmap threshold grows with each big free): the process
    stayed ~50 MB above what it used at 100k entries; malloc_trim takes ~5 ms. No-op where
    the C library has no malloc_trim."""
    import ctypes  # only here: ~1 MB that most runs never need

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
