"""Istio's NameTable and the lookup built from it, exactly as Istio's agent builds it
(``pkg/dns/client/dns.go``: ``BuildAlternateHosts``, ``generateAltHosts``, ``buildDNSAnswers``,
``lookupHost``), with names kept in lower-case wire form so queries are looked up by bytes."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from vmagent.dns.nameindex import build_index_steps
from vmagent.dns.names import packed_ip, split_ips, wire_name, wire_names
from vmagent.dns.steps import STEP_ENTRIES, Steps, run_steps, take_apart
from vmagent.dns.wire import WireError, encode_name

REGISTRY_KUBERNETES = "Kubernetes"


class NameTableError(ValueError):
    """A NameTable that cannot be used; the message names the host and the problem."""


class NameInfo(NamedTuple):
    """``istio.networking.nds.v1.NameTable.NameInfo``. A named tuple: three times quicker to
    make than a frozen dataclass (100k per table), and of only atomic parts, so the garbage
    collector stops tracking a kept table after one pass."""

    ips: tuple[str, ...]
    registry: str = ""
    shortname: str = ""
    namespace: str = ""
    alt_hosts: tuple[str, ...] = ()


_INFO_FIELDS = {"ips", "registry", "shortname", "namespace", "alt_hosts", "altHosts"}


def _strings(value: Any, host: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                break
        else:
            return tuple(value)
    raise NameTableError(f"{host}: {key}: expected a list of strings")


def _string(value: Any, host: str, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise NameTableError(f"{host}: {key}: expected a string")
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
    # One str object per distinct registry/namespace value (JSON decoding makes a new one per
    # entry): at 100k entries that is ~10 MB less for the table the proxy keeps.
    shared: dict[str, str] = {}
    for host, info in table.items():
        if not isinstance(info, Mapping):
            raise NameTableError(f"{host}: entry must be an object")
        if not _INFO_FIELDS.issuperset(info):
            bad = set(info) - _INFO_FIELDS
            raise NameTableError(f"{host}: unknown fields {sorted(bad)}")
        ips = _strings(info.get("ips"), host, "ips")
        for ip in ips:
            if packed_ip(ip) is None:
                raise NameTableError(f"{host}: {ip!r} is not an IP address")
        if wire_name(host) is None or host in _ROOT:  # the fast check; check_host says why
            check_host(host)
        result[host] = NameInfo(
            ips=ips,
            registry=_shared(shared, _string(info.get("registry"), host, "registry")),
            shortname=_string(info.get("shortname"), host, "shortname"),
            namespace=_shared(shared, _string(info.get("namespace"), host, "namespace")),
            alt_hosts=_strings(info.get("alt_hosts", info.get("altHosts")), host, "alt_hosts"),
        )
    return result


_ROOT = ("", ".")  # the DNS root: a valid name but no host (Istio's NameTable keys are hosts)


def check_host(host: str) -> None:
    """NameTableError when ``host`` is not a valid DNS name (saying why), or is the root."""
    if host in _ROOT:
        raise NameTableError(f"{host!r}: not a valid DNS name (the root; an entry names a host)")
    if wire_name(host) is None:
        try:
            encode_name(host)
        except (WireError, UnicodeError) as exc:
            raise NameTableError(f"{host}: not a valid DNS name ({exc})") from None


def check_ips(host: str, ips: Iterable[str]) -> None:
    """NameTableError naming the first of ``ips`` that is not an IP address."""
    for ip in ips:
        if packed_ip(ip) is None:
            raise NameTableError(f"{host}: {ip!r} is not an IP address")


def _shared(strings: dict[str, str], value: str) -> str:
    return strings.setdefault(value, value)


@dataclass(frozen=True, slots=True)
class HostRecord:
    """What a name answers: an optional CNAME target, and the addresses of the final name."""

    cname: bytes | None
    v4: tuple[bytes, ...]
    v6: tuple[bytes, ...]


# A name's value in the lookup: a flag byte (ALIASED: the name has a search-domain alias), the
# IPv4 count (2 bytes), the packed IPv4s, then the packed IPv6s. Plain bytes, so the lookup's
# dict holds nothing the garbage collector tracks (a 100k-service table adds no work to a GC
# pass), and every name of a service shares one value object (one encoded answer per service).
# Search-domain aliases (name + search[0], answered with a CNAME) are not stored: a question
# ending in search[0] is cut back to the name it would alias, which halves the table's memory.
ALIASED = 1


def _pack(v4: tuple[bytes, ...], v6: tuple[bytes, ...], aliased: bool) -> bytes:
    return bytes((aliased,)) + len(v4).to_bytes(2, "big") + b"".join(v4) + b"".join(v6)


def _unpack(value: bytes) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    end4 = 3 + 4 * int.from_bytes(value[1:3], "big")
    v4 = tuple(value[i : i + 4] for i in range(3, end4, 4))
    return v4, tuple(value[i : i + 16] for i in range(end4, len(value), 16))


@dataclass(frozen=True)
class Lookup:
    """The immutable query-time view of a NameTable; swapped whole on every update.

    ``names``: every name given by the table (lower-case wire form) -> its value (above);
    ``search``: search[0] in wire form when names get aliases, else empty; ``size``: names
    answered, aliases included. ``hosts`` shows them all as HostRecords."""

    names: Mapping[bytes, bytes] = field(default_factory=dict)
    entries: int = 0
    search: bytes = b""
    size: int = 0

    @property
    def hosts(self) -> Mapping[bytes, HostRecord]:
        """Every answered name and its record (a view, decoded on access)."""
        return _HostsView(self)

    def alias_target(self, name: bytes) -> bytes | None:
        """The name ``name`` is the search-domain alias of (``name`` = it + search[0]), if any."""
        search = self.search
        if not search or not name.endswith(search):
            return None
        # A stored name's labels end exactly where ``search`` starts, so a suffix match that
        # is not at a label boundary finds nothing stored; the root has no alias (flag unset).
        target = name[: len(name) - len(search)] + b"\x00"
        value = self.names.get(target)
        return target if value is not None and value[0] == ALIASED else None

    def get(self, name: bytes) -> HostRecord | None:
        """The record of exactly ``name``: an alias (CNAME to the name it aliases, with that
        name's addresses) wins over the same name given directly, as in Istio's table."""
        target = self.alias_target(name)
        if target is not None:
            return HostRecord(target, *_unpack(self.names[target]))
        value = self.names.get(name)
        return None if value is None else HostRecord(None, *_unpack(value))

    def find(self, name: bytes) -> HostRecord | None:
        """Exact match, else wildcards from most to least specific (``*.b.c.`` before ``*.c.``).

        A wildcard match whose record is a search-domain alias of a wildcard (``*.w.`` +
        search[0], CNAME ``*.w.``) gets the CNAME target with ``*`` replaced by the labels it
        matched: ``foo.w.ns1.svc.cluster.local.`` -> ``CNAME foo.w.``, as autopath would. Istio
        answers ``CNAME *.w.`` plus records owned by ``*.w.`` (istio/istio#61732, open), which
        glibc then reports as the canonical name; no answer here ever carries a ``*`` label
        the question did not have."""
        record = self.get(name)
        if record is not None:
            return record
        off = 0
        while name[off]:
            off += 1 + name[off]
            record = self.get(b"\x01*" + name[off:])
            if record is not None:
                cname = record.cname
                if cname is not None and cname.startswith(b"\x01*"):
                    return HostRecord(name[:off] + cname[2:], record.v4, record.v6)
                return record
        return None


class _HostsView(Mapping[bytes, HostRecord]):
    __slots__ = ("_lookup",)

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup

    def __getitem__(self, name: bytes) -> HostRecord:
        record = self._lookup.get(name)
        if record is None:
            raise KeyError(name)
        return record

    def __iter__(self) -> Iterator[bytes]:
        names, search = self._lookup.names, self._lookup.search
        yield from names
        for name, value in names.items():
            if value[0] == ALIASED:
                alias = name[:-1] + search
                if len(alias) <= 255 and alias not in names:
                    yield alias

    def __len__(self) -> int:
        return self._lookup.size


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


def alt_hosts(
    host: str, info: NameInfo, scope: TableScope, parts: list[str] | None = None
) -> list[str]:
    """Names one NameTable entry answers to (Istio's BuildAlternateHosts); ``parts``:
    ``scope.proxy_domain_parts``, computed once by callers that expand many entries."""
    parts = scope.proxy_domain_parts if parts is None else parts
    return _alt_hosts(host, info, scope.namespace, ".".join(parts), parts[0] if parts else "")


def _alt_hosts(host: str, info: NameInfo, namespace: str, domain: str, first: str) -> list[str]:
    if info.registry != REGISTRY_KUBERNETES:
        return [host if host.endswith(".") else host + "."]
    if not domain or not host.endswith(domain):
        return [host + "."]
    short, ns = info.shortname, info.namespace
    out = [host + ".", f"{short}.{ns}."]
    if namespace == ns:
        out.append(f"{short}.")
    out.append(f"{short}.{ns}.{first}.")
    if info.alt_hosts:
        out.extend(alt + "." for alt in info.alt_hosts)
    return list(dict.fromkeys(out))


def build_lookup(table: Mapping[str, NameInfo], scope: TableScope, strict: bool = False) -> Lookup:
    """Expand a NameTable into the lookup (pure; about a second for 100k services)."""
    return run_steps(build_lookup_steps(table, scope, tidy=False, strict=strict))


def build_lookup_steps(
    table: Mapping[str, NameInfo], scope: TableScope, tidy: bool = True, strict: bool = False
) -> Steps[Lookup]:
    """:func:`build_lookup`, yielding every ``STEP_ENTRIES`` entries, so that an event loop
    driving it (``vmagent.dns.service.run_in_slices``) keeps answering queries meanwhile;
    ``tidy``: free the big temporary dicts a slice at a time too.

    ``strict``: a table not checked by :func:`parse_name_table` (decoded protobuf NameInfo
    messages, which have the same fields): its checks are made here, on the way, with the
    same NameTableError for the same first bad entry, instead of in a pass of their own
    (~0.3 s less for a pushed 100k-entry table, issue 7 §5).

    Later entries win for a name two entries share, per address family (Istio's map writes);
    a search-domain alias wins over the same name given directly."""
    # wire name -> (IPv4s, IPv6s, has an alias)
    found: dict[bytes, tuple[tuple[bytes, ...], tuple[bytes, ...], bool]] = {}
    # Istio (buildDNSAnswers): no alias for a name that already ends in search[0] (a plain
    # string suffix test, as Istio's strings.HasSuffix); reference 3.4 step 5.
    search = scope.search[0].lower().rstrip(".") + "." if scope.search else ""
    search_wire = (wire_name(search) or b"") if search else b""
    if len(search_wire) <= 1:
        search_wire = b""  # no valid alias can be made (an empty label, or the root)
    parts = scope.proxy_domain_parts
    namespace, domain, first = scope.namespace, ".".join(parts), parts[0] if parts else ""
    found_get = found.get
    tails: dict[str, bytes] = {}  # wire forms of the names' parents (few: the namespaces)
    for count, (host, info) in enumerate(table.items(), 1):
        if count % STEP_ENTRIES == 0:
            yield
        v4, v6 = split_ips(info.ips)
        if strict and len(v4) + len(v6) != len(info.ips):
            check_ips(host, info.ips)
        if not v4 and not v6:
            if strict:
                check_host(host)
            continue
        plain, aliased = (v4, v6, False), (v4, v6, True)
        texts = _alt_hosts(host, info, namespace, domain, first)
        wires = wire_names(texts, tails)
        if strict and (wires[0] is None or host in _ROOT):  # the entry's own name, any registry
            check_host(host)
        own = set(wires)
        for name, wire in zip(texts, wires):
            if wire is None:
                continue
            alias = False
            # The alias is name + search[0]: not for a name already ending in it (as text),
            # not when it is one of the entry's own names, nor when it is no valid name.
            plain_name = len(wire) > 1 and name[-2:] != ".."
            if search_wire and plain_name and not name.lower().endswith(search):
                expanded = wire[:-1] + search_wire
                alias = len(expanded) <= 255 and expanded not in own
            old = found_get(wire)
            if old is None:
                found[wire] = aliased if alias else plain
            else:
                found[wire] = (v4 or old[0], v6 or old[1], alias or old[2])
    # One packed value per distinct (addresses, alias flag): shared by a service's names.
    numbers: dict[tuple[tuple[bytes, ...], tuple[bytes, ...], bool], int] = {}
    values: list[bytes] = []
    value_of = array("I")
    aliases = 0  # aliases that are not also stored names (answered names = stored + these)
    for count, (wire, triple) in enumerate(found.items(), 1):
        if count % (STEP_ENTRIES * 10) == 0:
            yield
        number = numbers.get(triple)
        if number is None:
            number = numbers[triple] = len(values)
            values.append(_pack(*triple))
        value_of.append(number)
        if triple[2] and (wire[:-1] + search_wire) not in found:
            aliases += 1
    index = yield from build_index_steps(found, value_of, values)
    if tidy:
        yield from take_apart(found)
        yield from take_apart(numbers)
    return Lookup(index, len(table), search_wire, len(index) + aliases)
