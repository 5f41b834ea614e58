"""What a proxy's data plane is made of, read from the mesh config and the registry (pure):
the service ports it can call (outbound) with their healthy endpoints, and the ports of its own
workload it serves (inbound). :mod:`~vmagent.devmesh.clusters` and
:mod:`~vmagent.devmesh.listeners` turn these into Envoy resources.

- Outbound: every service the proxy sees (exportTo and Sidecar egress, as for NameTables),
  except wildcard hosts and services whose resolution is not ``STATIC`` (devmesh has no DNS or
  passthrough clusters), for each of its ports.
- Endpoints (istiod's EDS): the service's ready static ``endpoints`` (port = the service port)
  and the *healthy* WorkloadEntries its ``workloadSelector`` picks (port = the entry's port of
  the same name, else the service port), both on the proxy's network (empty matches any).
  WorkloadEntries run a sidecar, so they are mesh endpoints (mTLS); a static endpoint is one
  when its labels carry ``security.istio.io/tlsMode: istio``.
- Inbound: the ports of the proxy's own WorkloadEntry that the services selecting it expose.

Without traffic capture (``DataplaneOptions.capture=False``, for development and tests without
iptables), a mesh endpoint's port is the inbound listener's port, and the inbound listener
picks the app port from the SNI the client sends; see :mod:`~vmagent.devmesh.listeners`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from vmagent.devmesh.nametable import ROOT_NAMESPACE, visible
from vmagent.devmesh.node import ProxyNode
from vmagent.devmesh.registry import WorkloadEntry
from vmagent.devmesh.services import MeshConfig, Port, Service
from vmagent.devmesh.tlscontext import TLS_MODE_LABEL, sni

HTTP_PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "GRPC-WEB")


@dataclass(frozen=True)
class DataplaneOptions:
    """Where the capture listeners are. Istio's defaults; tests move them to free loopback
    ports and turn ``capture`` off (no iptables): outbound HTTP port listeners then bind to
    ``outbound_bind:<service port>`` and mesh endpoints are reached on ``inbound_port``."""

    capture: bool = True
    listen_address: str = "0.0.0.0"
    outbound_port: int = 15001
    inbound_port: int = 15006
    outbound_bind: str = "127.0.0.1"
    # ``vmagent dev --app-port``: the app of a group listens elsewhere than its template says.
    port_moves: tuple[PortMove, ...] = ()


@dataclass(frozen=True)
class PortMove:
    """Group ``namespace/group``'s workload port ``old`` is really ``new`` (the demo app moved
    by ``vmagent dev --app-port``): its template ports, so the WorkloadEntry, the endpoints
    and the inbound cluster (``inbound|new||``) all say ``new``."""

    namespace: str
    group: str
    old: int
    new: int


def move_group_ports(config: MeshConfig, moves: Sequence[PortMove]) -> MeshConfig:
    """``config`` with each move applied to its group's template ports: a port numbered
    ``old`` becomes ``new``, and a port of a selecting service that the template does not
    name and that would default to ``old`` (the service port) is added as ``new``. Applied
    on every load, so it survives config reloads."""
    if not moves:
        return config
    groups = []
    for group in config.groups:
        ports = dict(group.ports)
        labels = {**group.template_labels, **group.labels}
        selecting = [
            s
            for s in config.services
            if s.workload_selector is not None
            and s.namespace == group.namespace
            and all(labels.get(k) == v for k, v in s.workload_selector.items())
        ]
        for move in moves:
            if (move.namespace, move.group) != (group.namespace, group.name):
                continue
            ports = {name: move.new if n == move.old else n for name, n in ports.items()}
            for port in (p for s in selecting for p in s.ports):
                if port.name not in ports and port.number == move.old:
                    ports[port.name] = move.new
        groups.append(replace(group, ports=ports) if ports != dict(group.ports) else group)
    return replace(config, groups=tuple(groups))


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int
    mesh: bool  # runs a sidecar: reached with Istio mTLS
    weight: int = 0


@dataclass(frozen=True)
class OutboundPort:
    service: Service
    port: Port
    endpoints: tuple[Endpoint, ...]

    @property
    def cluster(self) -> str:
        return f"outbound|{self.port.number}||{self.service.host}"

    @property
    def http(self) -> bool:
        return is_http(self.port)


@dataclass(frozen=True)
class InboundPort:
    """A port of the proxy's own workload: ``target`` is where the app listens; ``snis`` are
    the SNIs clients send for it (one per selecting service port)."""

    target: int
    http: bool
    snis: tuple[str, ...]

    @property
    def cluster(self) -> str:
        return f"inbound|{self.target}||"


def is_http(port: Port) -> bool:
    """Istio's protocol sniffing by declaration: the ``protocol`` field, else the name prefix."""
    protocol = port.protocol.upper()
    if protocol in HTTP_PROTOCOLS:
        return True
    name = port.name.lower()
    return protocol == "TCP" and (name in ("http", "http2", "grpc") or name.startswith("http-"))


def selects(service: Service, entry: WorkloadEntry) -> bool:
    selector = service.workload_selector
    if selector is None or entry.namespace != service.namespace:
        return False
    return all(entry.labels.get(k) == v for k, v in selector.items())


def _same_network(network: str, proxy: ProxyNode) -> bool:
    return not network or not proxy.network or network == proxy.network


def endpoints_of(
    service: Service,
    port: Port,
    entries: Sequence[WorkloadEntry],
    proxy: ProxyNode,
    options: DataplaneOptions,
) -> tuple[Endpoint, ...]:
    out: list[Endpoint] = []
    for static in service.endpoints:
        if static.ready and _same_network(static.network, proxy):
            mesh = static.labels.get(TLS_MODE_LABEL) == "istio"
            target = options.inbound_port if mesh and not options.capture else port.number
            out.append(Endpoint(static.address, target, mesh))
    for entry in entries:
        if selects(service, entry) and entry.healthy and _same_network(entry.network, proxy):
            target = entry.ports.get(port.name, port.number)
            if not options.capture:
                target = options.inbound_port
            out.append(Endpoint(entry.address, target, True, entry.weight))
    return tuple(sorted(set(out), key=lambda e: (e.address, e.port)))


def outbound_ports(
    config: MeshConfig,
    entries: Sequence[WorkloadEntry],
    proxy: ProxyNode,
    options: DataplaneOptions,
) -> list[OutboundPort]:
    """Every (service, port) the proxy can call, in config order."""
    sidecar = config.sidecar(proxy.namespace) or config.sidecar(ROOT_NAMESPACE)
    out = []
    for service in config.services:
        if service.wildcard or service.resolution != "STATIC":
            continue
        if not visible(service, proxy.namespace, sidecar):
            continue
        for port in service.ports:
            out.append(
                OutboundPort(service, port, endpoints_of(service, port, entries, proxy, options))
            )
    return out


def inbound_ports(config: MeshConfig, own: WorkloadEntry | None) -> list[InboundPort]:
    """The ports of ``own`` (the proxy's WorkloadEntry) that services selecting it expose."""
    if own is None:
        return []
    found: dict[int, tuple[bool, list[str]]] = {}
    for service in config.services:
        if not selects(service, own):
            continue
        for port in service.ports:
            target = own.ports.get(port.name, port.number)
            _, snis = found.setdefault(target, (is_http(port), []))
            snis.append(sni(port.number, service.host))
    return [
        InboundPort(target, http, tuple(sorted(set(snis))))
        for target, (http, snis) in sorted(found.items())
    ]
