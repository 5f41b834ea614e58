"""LDS resources for a proxy, shaped as istiod's ``pilot/pkg/networking/core`` (sidecar
listeners) builds them, trimmed (JSON-ready dicts).

- ``virtualOutbound`` on ``0.0.0.0:15001`` with ``use_original_dst``: captured outbound
  connections are handed to the listener of their original destination; anything else goes
  to ``PassthroughCluster``.
- ``0.0.0.0_<port>`` per outbound HTTP service port (``bind_to_port: false``): an HTTP
  connection manager using route configuration ``<port>`` over ADS (RDS).
- ``<vip>_<port>`` per outbound TCP service port and VIP (``bind_to_port: false``): TCP proxy
  to the service's cluster.
- ``virtualInbound`` on ``0.0.0.0:15006`` (no hand-off), ``original_dst`` and
  ``tls_inspector`` listener filters: per inbound port a filter chain matching the destination
  port, TLS and Istio's mTLS ALPNs terminates Istio mTLS with the SDS certificates and forwards
  to ``inbound|<port>||``. HTTP ports use an HTTP connection manager with
  ``forward_client_cert_details: APPEND_FORWARD`` and ``set_current_client_cert_details`` (URI,
  subject, DNS), so the app sees the caller's SPIFFE ID in ``x-forwarded-client-cert``.
  Anything else (plaintext, unknown ports) goes to ``BlackHoleCluster``: STRICT mTLS.

Without capture (``capture=False``): HTTP port listeners bind to ``outbound_bind:<port>``
(clients call them directly, as with Istio's ``INTERCEPTION_MODE=NONE``), clients reach mesh
endpoints on the inbound listener's port, and inbound filter chains match the SNI the client
sent (``outbound_.<port>_._.<host>``) instead of the original destination port.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmagent.devmesh.clusters import ADS_SOURCE, BLACKHOLE, PASSTHROUGH
from vmagent.devmesh.dataplane_model import DataplaneOptions, InboundPort, OutboundPort
from vmagent.devmesh.tlscontext import MTLS_ALPNS, downstream_mtls

VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
_TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3"
_ORIGINAL_DST = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3"


def _address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": _TCP, "stat_prefix": stat_prefix, "cluster": cluster},
    }


def _router() -> dict[str, Any]:
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}


def _hcm(stat_prefix: str, routes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"{_HCM}.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            **routes,
            "http_filters": [_router()],
            **extra,
        },
    }


def virtual_outbound(options: DataplaneOptions) -> dict[str, Any]:
    return {
        "name": VIRTUAL_OUTBOUND,
        "address": _address(options.listen_address, options.outbound_port),
        "use_original_dst": True,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [
            {"name": "PassthroughFilterChain", "filters": [tcp_proxy(PASSTHROUGH, PASSTHROUGH)]}
        ],
    }


def _http_port_listener(port: int, options: DataplaneOptions) -> dict[str, Any]:
    rds = {"rds": {"config_source": ADS_SOURCE, "route_config_name": str(port)}}
    bind = not options.capture
    address = options.outbound_bind if bind else "0.0.0.0"
    return {
        "name": f"0.0.0.0_{port}",
        "address": _address(address, port),
        "bind_to_port": bind,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [{"filters": [_hcm(f"outbound_0.0.0.0_{port}", rds)]}],
    }


def _tcp_port_listeners(item: OutboundPort) -> list[dict[str, Any]]:
    port = item.port.number
    return [
        {
            "name": f"{vip}_{port}",
            "address": _address(vip, port),
            "bind_to_port": False,
            "traffic_direction": "OUTBOUND",
            "filter_chains": [{"filters": [tcp_proxy(item.cluster, item.cluster)]}],
        }
        for vip in item.service.addresses
        if "/" not in vip
    ]


def outbound_listeners(items: Sequence[OutboundPort], options: DataplaneOptions) -> list[Any]:
    """``virtualOutbound`` and the per-port listeners it hands connections to. Without capture
    only HTTP ports get listeners (a bound TCP port could serve only one service)."""
    out = [virtual_outbound(options)]
    http_ports = sorted({i.port.number for i in items if i.http})
    out += [_http_port_listener(port, options) for port in http_ports]
    if options.capture:
        seen: set[str] = {f"0.0.0.0_{port}" for port in http_ports}
        for item in items:
            if item.http:
                continue
            for listener in _tcp_port_listeners(item):
                if listener["name"] not in seen:
                    seen.add(listener["name"])
                    out.append(listener)
    return out


def _inbound_chain(item: InboundPort, options: DataplaneOptions) -> dict[str, Any]:
    match: dict[str, Any] = {"transport_protocol": "tls", "application_protocols": list(MTLS_ALPNS)}
    if options.capture:
        match["destination_port"] = item.target
    else:
        match["server_names"] = list(item.snis)
    prefix = f"inbound_0.0.0.0_{item.target}"
    if item.http:
        routes = {
            "route_config": {
                "name": item.cluster,
                "virtual_hosts": [
                    {
                        "name": f"inbound|http|{item.target}",
                        "domains": ["*"],
                        "routes": [
                            {
                                "name": "default",
                                "match": {"prefix": "/"},
                                "route": {"cluster": item.cluster, "timeout": "0s"},
                            }
                        ],
                    }
                ],
                "validate_clusters": False,
            }
        }
        network_filter = _hcm(
            prefix,
            routes,
            forward_client_cert_details="APPEND_FORWARD",
            set_current_client_cert_details={"subject": True, "dns": True, "uri": True},
        )
    else:
        network_filter = tcp_proxy(prefix, item.cluster)
    return {
        "name": f"{item.cluster}-mtls",
        "filter_chain_match": match,
        "transport_socket": downstream_mtls(),
        "filters": [network_filter],
    }


def virtual_inbound(items: Sequence[InboundPort], options: DataplaneOptions) -> dict[str, Any]:
    tls_inspector = {
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": {"@type": f"{_TLS_INSPECTOR}.TlsInspector"},
    }
    original_dst = {
        "name": "envoy.filters.listener.original_dst",
        "typed_config": {"@type": f"{_ORIGINAL_DST}.OriginalDst"},
    }
    return {
        "name": VIRTUAL_INBOUND,
        "address": _address(options.listen_address, options.inbound_port),
        # No hand-off: the original_dst filter restores the destination for the chains'
        # destination_port match; a hand-off would give VM-IP:8080 to the outbound listener
        # 0.0.0.0_8080 (bind_to_port false) of a service on the same port, which speaks
        # plaintext HTTP (seen with two VMs: tests/e2e/test_e2e_two_vms.py).
        "use_original_dst": False,
        "traffic_direction": "INBOUND",
        "listener_filters": ([original_dst] if options.capture else []) + [tls_inspector],
        "filter_chains": [_inbound_chain(item, options) for item in items],
        "default_filter_chain": {
            "name": "BlackHoleFilterChain",
            "filters": [tcp_proxy(BLACKHOLE, BLACKHOLE)],
        },
    }
