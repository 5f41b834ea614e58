"""Istio's NameTable and the lookup built from it, exactly as Istio's agent builds it
(``pkg/dns/client/dns.go``: ``BuildAlternateHosts``, ``generateAltHosts``, ``buildDNSAnswers``,
``lookupHost``), with names kept in lower-case wire form so queries are looked up by bytes."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vmagent.dns.wire import WireError, encode_name

REGISTRY_KUBERNETES = "Kubernetes"


class NameTableError(ValueError):
    """A NameTable that cannot be used; the message names the host and the problem."""


@dataclass(frozen=True, slots=True)
class NameInfo:
    """``istio.networking.nds.v1.NameTable.NameInfo``."""

    ips: tuple[str, ...]
    registry: str = ""
    shortname: str = ""
    namespace: str = ""
    alt_hosts: tuple[str, ...] = ()


_INFO_FIELDS = {"ips", "registry", "shortname", "namespace", "alt_hosts", "altHosts"}


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NameTableError(f"{where}: expected a list of strings")
    return tuple(value)


def _string(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise NameTableError(f"{where}: expected a string")
    return value


def parse_name_table(document: Any) -> dict[str, NameInfo]:
    """Validate a NameTable in protobuf JSON mapping: ``{"table": {host: NameInfo}}``."""
    if not isinstance(document, Mapping):
        raise NameTableError("name table: expected a JSON object with a 'table' key")
    unknown = set(document) - {"table"}
    if unknown:
        raise NameTableError(f"name table: unknown keys {sorted(unknown)}")
    table = document.get("table")
    table = {} if table is None else table
    if not isinstance(table, Mapping):
        raise NameTableError("name table: 'table' must map host names to entries")
    result: dict[str, NameInfo] = {}
    for host, info in table.items():
        if not isinstance(info, Mapping):
            raise NameTableError(f"{host}: entry must be an object")
        bad = set(info) - _INFO_FIELDS
        if bad:
            raise NameTableError(f"{host}: unknown fields {sorted(bad)}")
        ips = _strings(info.get("ips"), f"{host}: ips")
        for ip in ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise NameTableError(f"{host}: {ip!r} is not an IP address") from None
        try:
            encode_name(host)
        except (WireError, UnicodeError) as exc:
            raise NameTableError(f"{host}: not a valid DNS name ({exc})") from None
        result[host] = NameInfo(
            ips=ips,
            registry=_string(info.get("registry"), f"{host}: registry"),
            shortname=_string(info.get("shortname"), f"{host}: shortname"),
            namespace=_string(info.get("namespace"), f"{host}: namespace"),
            alt_hosts=_strings(info.get("alt_hosts", info.get("altHosts")), f"{host}: alt_hosts"),
        )
    return result


@dataclass(frozen=True, slots=True)
class HostRecord:
    """What a name answers: an optional CNAME target, and the addresses of the final name."""

    cname: bytes | None
    v4: tuple[bytes, ...]
    v6: tuple[bytes, ...]


@dataclass(frozen=True)
class Lookup:
    """The immutable query-time view of a NameTable; swapped whole on every update."""

    hosts: Mapping[bytes, HostRecord] = field(default_factory=dict)
    entries: int = 0

    def find(self, name: bytes) -> HostRecord | None:
        """Exact match, else wildcards from most to least specific (``*.b.c.`` before ``*.c.``)."""
        hosts = self.hosts
        record = hosts.get(name)
        if record is not None:
            return record
        off = 0
        while name[off]:
            off += 1 + name[off]
            record = hosts.get(b"\x01*" + name[off:])
            if record is not None:
                return record
        return None


@dataclass(frozen=True)
class TableScope:
    """The proxy-side inputs of the expansion: namespace, domain and the search list."""

    namespace: str
    cluster_domain: str = "cluster.local"
    search: tuple[str, ...] = ()

    @property
    def proxy_domain_parts(self) -> list[str]:
        # Istio: --domain defaults to <ns>.svc.<cluster domain>; a first label equal to the
        # namespace is dropped, leaving "svc.cluster.local".
        parts = f"{self.namespace}.svc.{self.cluster_domain}".split(".")
        return parts[1:] if parts[0] == self.namespace else parts


def alt_hosts(host: str, info: NameInfo, scope: TableScope) -> list[str]:
    """Names one NameTable entry answers to (Istio's BuildAlternateHosts)."""
    if info.registry != REGISTRY_KUBERNETES:
        return [host if host.endswith(".") else host + "."]
    out = [host + "."]
    parts = scope.proxy_domain_parts
    proxy_domain = ".".join(parts)
    if not proxy_domain or not host.endswith(proxy_domain):
        return out
    short, ns = info.shortname, info.namespace
    out.append(f"{short}.{ns}.")
    if scope.namespace == ns:
        out.append(f"{short}.")
    out.append(f"{short}.{ns}.{parts[0]}.")
    out.extend(alt + "." for alt in info.alt_hosts)
    return list(dict.fromkeys(out))


def build_lookup(table: Mapping[str, NameInfo], scope: TableScope) -> Lookup:
    """Expand a NameTable into the lookup (pure; may take a while for big tables)."""
    name4: dict[bytes, tuple[bytes, ...]] = {}
    name6: dict[bytes, tuple[bytes, ...]] = {}
    cnames: dict[bytes, bytes] = {}
    all_hosts: dict[bytes, None] = {}
    search = scope.search[0] if scope.search else ""
    for host, info in table.items():
        v4, v6 = _split_ips(info.ips)
        if not v4 and not v6:
            continue
        names = alt_hosts(host, info, scope)
        wire_names = {_wire(n) for n in names}
        for name in names:
            wire = _wire(name)
            if wire is None:
                continue
            all_hosts[wire] = None
            if v4:
                name4[wire] = v4
            if v6:
                name6[wire] = v6
            if search:
                expanded = _wire(name.lower() + search.rstrip(".") + ".")
                if expanded is not None and expanded not in wire_names:
                    cnames[expanded] = wire
                    all_hosts[expanded] = None
    hosts: dict[bytes, HostRecord] = {}
    for wire in all_hosts:
        target = cnames.get(wire)
        final = target if target is not None else wire
        hosts[wire] = HostRecord(target, name4.get(final, ()), name6.get(final, ()))
    return Lookup(hosts=hosts, entries=len(table))


def _wire(name: str) -> bytes | None:
    try:
        return encode_name(name)
    except (WireError, UnicodeError):
        return None  # an alias that is not a valid DNS name cannot be asked for


def _split_ips(ips: Iterable[str]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    v4: list[bytes] = []
    v6: list[bytes] = []
    for text in ips:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue  # Istio skips malformed IPs the same way
        (v4 if address.version == 4 else v6).append(address.packed)
    return tuple(v4), tuple(v6)
