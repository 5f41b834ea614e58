"""The DNS proxy as a service of the agent: config in, listeners up, tables swapped in."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping

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
from vmagent.dns.table import NameInfo, TableScope, build_lookup

log = logging.getLogger("vmagent.dns")


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

    async def close(self) -> None:
        await self.server.close()

    async def update_table(self, table: Mapping[str, NameInfo]) -> None:
        """Build the lookup off the event loop's thread and swap it in whole."""
        self._table = table
        await self._rebuild()

    async def _rebuild(self) -> None:
        table = self._table
        if table is None:
            return
        scope = TableScope(
            namespace=self.config.namespace,
            cluster_domain=self.config.vmagent_cluster_domain,
            search=self.search,
        )
        lookup = await asyncio.to_thread(build_lookup, table, scope)
        if table is not self._table:
            return  # a newer table arrived while this one was being built
        self.core.set_lookup(lookup, time.time())
        log.info(
            "dns: name table loaded: %d entries, %d names answered",
            lookup.entries,
            len(lookup.hosts),
        )

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
