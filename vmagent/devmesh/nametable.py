"""The NameTable a proxy gets, built as istiod's ``pkg/dns/server/name_table.go`` builds it.

Pure: the mesh config, the registered WorkloadEntries and the proxy go in, an
``istio.networking.nds.v1.NameTable`` comes out.

- Visibility (the proxy's Sidecar egress scope): a service's ``exportTo`` (``*``, ``.``, ``~``,
  namespace names) and the Sidecar of the proxy's namespace, else of the root namespace
  ``istio-system``, whose ``egress`` hosts are ``namespace/dnsName`` patterns.
- Addresses: the service's VIPs, filtered to the proxy's IP family unless it is dual-stack;
  CIDRs dropped and a CIDR-only service skipped. Without addresses, an External, non-wildcard,
  non-NONE service gets an auto-allocated ``240.240.x.y`` address when the node has
  ``DNS_CAPTURE=true`` and auto-allocation is on (node ``DNS_AUTO_ALLOCATE``, else the
  control plane's setting, default on).
- Headless/``NONE`` services with at least one port: the de-duplicated addresses of their
  endpoints (static ones and selected WorkloadEntries), ready/healthy ones only unless
  ``publishNotReadyAddresses``, on the proxy's network; endpoints with ``hostname`` and
  ``subdomain`` also get ``<hostname>.<subdomain>.<rest of the service host>``.
- Kubernetes hosts not ending in ``.clusterset.local`` carry ``namespace`` and ``shortname``;
  on a duplicate host a Kubernetes service replaces a non-Kubernetes entry and two
  non-Kubernetes entries merge their IPs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vmagent._proto import nds_pb2
from vmagent.devmesh.node import ProxyNode
from vmagent.devmesh.registry import WorkloadEntry
from vmagent.devmesh.services import KUBERNETES, MeshConfig, Service, Sidecar

ROOT_NAMESPACE = "istio-system"
CLUSTERSET_SUFFIX = ".clusterset.local"
_SLOTS = 255 * 254  # 240.240.<0-254>.<1-254>
_PRIME = 64763  # the largest prime below _SLOTS, for double hashing


def _fnv1a32(text: str) -> int:
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def _slot_address(slot: int) -> str:
    x = slot + slot // 254 + 1  # skip .0 and .255 in the last octet
    return f"240.240.{x // 255}.{x % 255}"


def allocate_addresses(config: MeshConfig) -> dict[tuple[str, str], str]:
    """Deterministic auto-allocated IPv4 per (namespace, host), hash-based like istiod's."""
    taken: set[int] = set()
    out: dict[tuple[str, str], str] = {}
    for svc in sorted(config.services, key=lambda s: (s.host, s.namespace)):
        if svc.registry == KUBERNETES or svc.addresses or svc.wildcard or svc.passthrough:
            continue
        first = _fnv1a32(svc.host)
        slot, step = first % _SLOTS, _PRIME - (first % _PRIME)
        for _ in range(_SLOTS):
            if slot not in taken:
                break
            slot = (slot + step) % _SLOTS
        else:
            continue  # out of addresses
        taken.add(slot)
        out[(svc.namespace, svc.host)] = _slot_address(slot)
    return out


def _egress_matches(pattern: str, sidecar_ns: str, svc: Service) -> bool:
    namespace, host = pattern.split("/", 1)
    if namespace == "~":
        return False
    if namespace == ".":
        namespace = sidecar_ns
    if namespace != "*" and namespace != svc.namespace:
        return False
    if host == "*" or host == svc.host:
        return True
    return host.startswith("*.") and svc.host.endswith(host[1:])


def visible(svc: Service, namespace: str, sidecar: Sidecar | None) -> bool:
    """Whether a proxy in ``namespace`` sees ``svc`` (exportTo, then Sidecar egress)."""
    exported = "*" in svc.export_to or namespace in svc.export_to
    if "." in svc.export_to and svc.namespace == namespace:
        exported = True
    if not exported:
        return False
    if sidecar is None:
        return True
    return any(_egress_matches(p, sidecar.namespace, svc) for p in sidecar.egress)


def _family_filter(addresses: Sequence[str], proxy: ProxyNode) -> list[str]:
    v4, v6 = proxy.v4, proxy.v6
    if v4 and v6:
        return list(addresses)

    def family(a: str) -> int:
        return ipaddress.ip_network(a, strict=False).version

    kept = [a for a in addresses if (v4 and family(a) == 4) or (v6 and family(a) == 6)]
    return kept or list(addresses)


def _selected(svc: Service, entries: Iterable[WorkloadEntry]) -> list[WorkloadEntry]:
    selector = svc.workload_selector
    if selector is None:
        return []
    return [
        e
        for e in entries
        if e.namespace == svc.namespace and all(e.labels.get(k) == v for k, v in selector.items())
    ]


@dataclass
class _Info:
    ips: list[str]
    registry: str
    shortname: str = ""
    namespace: str = ""
    alt_hosts: list[str] = field(default_factory=list)


def _same_network(network: str, proxy: ProxyNode) -> bool:
    return not network or not proxy.network or network == proxy.network


def _headless(
    svc: Service, entries: Sequence[WorkloadEntry], proxy: ProxyNode, table: dict[str, _Info]
) -> list[str]:
    if not svc.ports:
        return []
    candidates: list[tuple[str, str, bool, str, str]] = [
        (e.address, e.network, e.ready, e.hostname, e.subdomain) for e in svc.endpoints
    ]
    candidates += [(e.address, e.network, e.healthy, "", "") for e in _selected(svc, entries)]
    addresses: list[str] = []
    for address, network, ready, hostname, subdomain in candidates:
        if not ready and not svc.publish_not_ready:
            continue
        if not _same_network(network, proxy):
            continue
        if subdomain and "." in svc.host:
            shortname = f"{hostname}.{subdomain}"
            table[f"{shortname}.{svc.host.split('.', 1)[1]}"] = _Info(
                [address], svc.registry, shortname, svc.namespace
            )
        if address not in addresses:
            addresses.append(address)
    return addresses


def _addresses(
    svc: Service,
    entries: Sequence[WorkloadEntry],
    proxy: ProxyNode,
    allocated: Mapping[tuple[str, str], str],
    auto_allocate: bool,
    table: dict[str, _Info],
) -> list[str]:
    if svc.addresses:
        return [a for a in _family_filter(svc.addresses, proxy) if "/" not in a]
    address = allocated.get((svc.namespace, svc.host))
    if address and auto_allocate and proxy.dns_capture:
        return [address]
    if svc.passthrough:
        return _headless(svc, entries, proxy, table)
    return []


def build_name_table(
    config: MeshConfig,
    entries: Sequence[WorkloadEntry],
    proxy: ProxyNode,
    *,
    auto_allocate: bool = True,
    allocated: Mapping[tuple[str, str], str] | None = None,
) -> nds_pb2.NameTable:
    """The NameTable istiod would send ``proxy``; ``allocated`` caches
    :func:`allocate_addresses` for ``config``."""
    if allocated is None:
        allocated = allocate_addresses(config)
    node_allocate = proxy.dns_auto_allocate
    allocate = auto_allocate if node_allocate is None else node_allocate
    sidecar = config.sidecar(proxy.namespace) or config.sidecar(ROOT_NAMESPACE)
    table: dict[str, _Info] = {}
    for svc in config.services:
        if not visible(svc, proxy.namespace, sidecar):
            continue
        ips = _addresses(svc, entries, proxy, allocated, allocate, table)
        if not ips:
            continue
        kube = svc.registry == KUBERNETES and not svc.host.endswith(CLUSTERSET_SUFFIX)
        current = table.get(svc.host)
        if current is None:
            table[svc.host] = _Info(
                ips, svc.registry, svc.name if kube else "", svc.namespace if kube else ""
            )
        elif current.registry != KUBERNETES:
            if svc.registry == KUBERNETES:
                current.ips, current.registry = ips, KUBERNETES
                if kube:
                    current.namespace, current.shortname = svc.namespace, svc.name
            else:
                current.ips.extend(ips)
    out = nds_pb2.NameTable()
    for host, info in table.items():
        entry = out.table[host]
        entry.ips.extend(info.ips)
        entry.registry = info.registry
        entry.shortname = info.shortname
        entry.namespace = info.namespace
    return out
