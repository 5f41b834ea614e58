"""A proxy's Envoy data plane (LDS, CDS, EDS, RDS) built from the mesh config and the registry.
Pure: config, WorkloadEntries, node and options in; Any-packed ``xds-protos`` messages out,
each with a content version (a hash of its deterministic bytes, so an unchanged resource keeps
its version across pushes and delta xDS sends only what changed).

Production uses istiod; this is the small, readable subset ``vmagent dev`` and the tests need:
see :mod:`~vmagent.devmesh.dataplane_model` (what is in it), :mod:`~vmagent.devmesh.clusters`
and :mod:`~vmagent.devmesh.listeners` (the shapes), :mod:`~vmagent.devmesh.tlscontext` (mTLS).
Errors: a dict that does not parse as its proto raises ``json_format.ParseError`` (a bug here,
caught by the unit tests; Envoy itself validates the result in the integration tests).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

# Imported for their descriptors: ParseDict resolves the typed_config ``@type``s through them.
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from google.protobuf import any_pb2, json_format

from vmagent.devmesh.clusters import (
    fixed_clusters,
    inbound_cluster,
    load_assignment,
    outbound_cluster,
    route_configs,
)
from vmagent.devmesh.dataplane_model import DataplaneOptions, inbound_ports, outbound_ports
from vmagent.devmesh.listeners import outbound_listeners, virtual_inbound
from vmagent.devmesh.node import ProxyNode
from vmagent.devmesh.registry import WorkloadEntry
from vmagent.devmesh.services import MeshConfig

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
DATAPLANE_TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
# By the xDS spec (and istiod's ``IsWildcardTypeURL``) LDS and CDS are wildcard: an empty
# name list means everything; EDS and RDS send only the names asked for.
WILDCARD_TYPES = (CLUSTER, LISTENER)


@dataclass(frozen=True)
class Resource:
    name: str
    version: str  # content hash
    any: any_pb2.Any


Resources = Mapping[str, Resource]  # name -> resource, one type


def pack(message: Any) -> Resource:
    """A named message, Any-packed, versioned by the hash of its deterministic bytes."""
    payload = message.SerializeToString(deterministic=True)
    packed = any_pb2.Any(type_url=_PREFIX + message.DESCRIPTOR.full_name, value=payload)
    version = hashlib.sha256(payload).hexdigest()[:16]
    name = (
        message.cluster_name
        if isinstance(message, endpoint_pb2.ClusterLoadAssignment)
        else (message.name)
    )
    return Resource(name, version, packed)


def _parse(data: dict[str, Any], message: Any) -> Resource:
    return pack(json_format.ParseDict(data, message))


def build_dataplane(
    config: MeshConfig,
    entries: Sequence[WorkloadEntry],
    node: ProxyNode,
    own: WorkloadEntry | None,
    options: DataplaneOptions,
) -> dict[str, dict[str, Resource]]:
    """type URL -> name -> resource for ``node`` (``own``: its WorkloadEntry, if registered)."""
    outbound = outbound_ports(config, entries, node, options)
    inbound = inbound_ports(config, own)
    clusters = [outbound_cluster(i) for i in outbound] + [inbound_cluster(i) for i in inbound]
    clusters += fixed_clusters()
    listeners = [*outbound_listeners(outbound, options), virtual_inbound(inbound, options)]
    built: dict[str, list[Resource]] = {
        CLUSTER: [_parse(c, cluster_pb2.Cluster()) for c in clusters],
        ENDPOINT: [pack(load_assignment(i)) for i in outbound],
        LISTENER: [_parse(x, listener_pb2.Listener()) for x in listeners],
        ROUTE: [_parse(r, route_pb2.RouteConfiguration())
                for r in route_configs(outbound).values()],
    }  # fmt: skip
    return {type_url: {r.name: r for r in items} for type_url, items in built.items()}


def select(resources: Resources, type_url: str, names: Sequence[str]) -> dict[str, Resource]:
    """What a subscription gets: all (wildcard types with no names, or ``*``), else the names
    asked for that exist."""
    if type_url in WILDCARD_TYPES and (not names or "*" in names):
        return dict(resources)
    if "*" in names:
        return dict(resources)
    return {n: resources[n] for n in names if n in resources}
