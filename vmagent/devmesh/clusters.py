"""CDS, EDS and RDS resources for a proxy, shaped as istiod's ``pilot/pkg/networking/core``
builds them (JSON-ready dicts; :mod:`~vmagent.devmesh.dataplane` parses them into protos).

- ``ClusterLoadAssignment`` per outbound cluster (as a proto: the big, often pushed type).
- ``outbound|<port>||<host>``: EDS over ADS (``service_name`` = the cluster name), 10 s
  connect timeout, ``transport_socket_matches``: Istio mTLS to mesh endpoints, plaintext to
  others.
- ``inbound|<port>||``: STATIC ``127.0.0.1:<port>``, the local app.
- ``PassthroughCluster`` (ORIGINAL_DST, for captured traffic to unknown destinations) and
  ``BlackHoleCluster`` (no endpoints: what STRICT mTLS does with anything else).
- Route configuration ``<port>`` (outbound HTTP): a virtual host per service with the host,
  its Kubernetes short forms, the VIPs, each also with ``:<port>``; a domain is used once
  (Envoy rejects duplicates), and ``*`` goes to ``PassthroughCluster`` (ALLOW_ANY).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import json_format

from vmagent.devmesh.dataplane_model import Endpoint, InboundPort, OutboundPort
from vmagent.devmesh.services import KUBERNETES
from vmagent.devmesh.tlscontext import mesh_endpoint_metadata, socket_matches

PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"
CONNECT_TIMEOUT = "10s"
ADS_SOURCE = {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}


def outbound_cluster(item: OutboundPort) -> dict[str, Any]:
    return {
        "name": item.cluster,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": ADS_SOURCE, "service_name": item.cluster},
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "LEAST_REQUEST",
        "transport_socket_matches": socket_matches(item.port.number, item.service.host),
        "metadata": {
            "filter_metadata": {
                "istio": {
                    "services": [
                        {
                            "host": item.service.host,
                            "name": item.service.name,
                            "namespace": item.service.namespace,
                        }
                    ]
                }
            }
        },
    }


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _lb_endpoint(
    endpoint: Endpoint, mesh_metadata: base_pb2.Metadata
) -> endpoint_components_pb2.LbEndpoint:
    out = endpoint_components_pb2.LbEndpoint()
    address = out.endpoint.address.socket_address
    address.address, address.port_value = endpoint.address, endpoint.port
    if endpoint.mesh:
        out.metadata.CopyFrom(mesh_metadata)
    if endpoint.weight:
        out.load_balancing_weight.value = endpoint.weight
    return out


def load_assignment(item: OutboundPort) -> endpoint_pb2.ClusterLoadAssignment:
    """The ClusterLoadAssignment of ``item`` (no localities: an empty list when none). Built
    as a proto, not a dict: EDS is the big, often pushed type (ParseDict of 20k endpoints
    took seconds)."""
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=item.cluster)
    if item.endpoints:
        metadata = json_format.ParseDict(mesh_endpoint_metadata(), base_pb2.Metadata())
        out.endpoints.add().lb_endpoints.extend(_lb_endpoint(e, metadata) for e in item.endpoints)
    return out


def inbound_cluster(item: InboundPort) -> dict[str, Any]:
    return {
        "name": item.cluster,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": item.cluster,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket("127.0.0.1",
                                                                              item.target)}}]}],
        },
    }  # fmt: skip


def fixed_clusters() -> list[dict[str, Any]]:
    return [
        {
            "name": PASSTHROUGH,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": CONNECT_TIMEOUT,
        },
        {"name": BLACKHOLE, "type": "STATIC", "connect_timeout": CONNECT_TIMEOUT},
    ]


def _domains(item: OutboundPort) -> list[str]:
    svc, port = item.service, item.port.number
    names = [svc.host]
    if svc.registry == KUBERNETES and svc.host.count(".") >= 4:
        # name.ns.svc.cluster.local -> name, name.ns, name.ns.svc (what search domains resolve)
        parts = svc.host.split(".")
        if svc.namespace == parts[1]:
            names += [parts[0], ".".join(parts[:2]), ".".join(parts[:3])]
    names += list(svc.addresses)
    return [d for name in names for d in (name, f"{name}:{port}")]


def route_configs(items: Sequence[OutboundPort]) -> dict[str, dict[str, Any]]:
    """One route configuration per HTTP service port, named after the port."""
    by_port: dict[int, list[OutboundPort]] = {}
    for item in items:
        if item.http:
            by_port.setdefault(item.port.number, []).append(item)
    out: dict[str, dict[str, Any]] = {}
    for port, group in sorted(by_port.items()):
        used: set[str] = set()
        hosts = []
        for item in group:
            domains = [d for d in _domains(item) if d not in used]
            used.update(domains)
            if not domains:
                continue
            hosts.append(
                {
                    "name": f"{item.service.host}:{port}",
                    "domains": domains,
                    "routes": [
                        {
                            "name": "default",
                            "match": {"prefix": "/"},
                            "route": {"cluster": item.cluster, "timeout": "0s"},
                        }
                    ],
                }
            )
        hosts.append(
            {
                "name": "allow_any",
                "domains": ["*"],
                "routes": [
                    {"name": "allow_any", "match": {"prefix": "/"},
                     "route": {"cluster": PASSTHROUGH, "timeout": "0s"}}
                ],
            }
        )  # fmt: skip
        out[str(port)] = {
            "name": str(port),
            "virtual_hosts": hosts,
            "validate_clusters": False,
        }
    return out
