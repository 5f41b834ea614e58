"""Envoy's bootstrap and command line, as Istio's agent makes them
(``tools/packaging/common/envoy_bootstrap.json``, ``pkg/bootstrap/config.go``,
``pkg/envoy/proxy.go``), trimmed to what a VM needs. Pure: options and node in, JSON-ready
dict / argv out. Envoy itself validates the result (``envoy --mode validate``, in the tests).

Shape: admin on the loopback address of the node's IP family; LDS and CDS over ADS
(``initial_fetch_timeout: 0s``); ADS (``DELTA_GRPC``, or ``GRPC`` when ``ISTIO_DELTA_XDS=false``)
through static cluster ``xds-grpc`` and SDS through ``sds-grpc``, both HTTP/2 over the agent's
Unix sockets with a 1s connect timeout; static clusters ``prometheus_stats`` (-> admin) and
``agent`` (-> the status endpoint); listeners ``<wildcard>_15090`` (``/stats/prometheus``) and
``<wildcard>_15021`` (``/healthz/ready``, answered by the agent's readiness)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from vmagent.envoy.options import EnvoyOptions
from vmagent.xds.node import NodeInfo

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Without a timestamp (the agent's log has one); level first so the shell can map it.
LOG_FORMAT = "[%l][%n] %v"


def all_ipv6(ips: Sequence[str]) -> bool:
    """Istio's ``network.AllIPv6``: true when there is at least one IP and every one is v6."""
    if not ips:
        return False
    for text in ips:
        try:
            if ipaddress.ip_address(text.split("%", 1)[0]).version != 6:
                return False
        except ValueError:
            return False
    return True


def loopback(ips: Sequence[str]) -> str:
    return "::1" if all_ipv6(ips) else "127.0.0.1"


def wildcard(ips: Sequence[str]) -> str:
    return "::" if all_ipv6(ips) else "0.0.0.0"


def build_bootstrap(node: NodeInfo, options: EnvoyOptions) -> dict[str, Any]:
    """The bootstrap for ``node`` (id, cluster and metadata exactly as the agent's xDS client
    sends them; Envoy sends this node on its ADS stream, which the agent forwards)."""
    local = loopback(node.ips)
    listen = options.listen_address or wildcard(node.ips)
    ads = {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
    return {
        "node": {"id": node.id, "cluster": node.cluster, "metadata": _json_ready(node.metadata)},
        "application_log_config": {"log_format": {"text_format": LOG_FORMAT}},
        "admin": {
            "access_log": [_file_log("/dev/null")],
            "address": _socket(local, options.admin_port),
        },
        "dynamic_resources": {
            "lds_config": dict(ads),
            "cds_config": dict(ads),
            "ads_config": {
                "api_type": "DELTA_GRPC" if options.delta_xds else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
        },
        "static_resources": {
            "clusters": [
                _tcp_cluster("prometheus_stats", local, options.admin_port),
                _tcp_cluster("agent", options.status_host, options.status_port),
                _pipe_cluster("sds-grpc", options.sds_socket),
                _pipe_cluster("xds-grpc", options.xds_socket),
            ],
            "listeners": [
                _http_listener(
                    listen,
                    options.prometheus_port,
                    "stats",
                    "/stats/prometheus",
                    "prometheus_stats",
                ),
                _http_listener(listen, options.readiness_port, "agent", "/healthz/ready", "agent"),
            ],
        },
    }


def split_log_level(level: str) -> tuple[str, list[str]]:
    """Istio's ``splitComponentLog``: "info,misc:error" -> ("info", ["misc:error"])."""
    main = ""
    components: list[str] = []
    for part in level.split(","):
        part = part.strip()
        pieces = part.split(":")
        if len(pieces) == 1 and part:
            main = part
        elif len(pieces) == 2:
            components.append(part)
    return main, components


def command_line(
    binary: str, bootstrap_path: str, options: EnvoyOptions, node_ips: Sequence[str]
) -> list[str]:
    """Envoy's argv (``pkg/envoy/proxy.go`` ``args``): drain time in whole seconds, v6 local
    addresses only when every node IP is v6, 1s access-log flush, no hot restart."""
    argv = [
        binary,
        "-c", bootstrap_path,
        "--drain-time-s", str(int(options.drain_duration)),
        "--drain-strategy", "immediate",
        "--local-address-ip-version", "v6" if all_ipv6(node_ips) else "v4",
        "--file-flush-interval-msec", "1000",
        "--disable-hot-restart",
        "--allow-unknown-static-fields",
    ]  # fmt: skip
    level, components = split_log_level(options.log_level)
    if level:
        argv += ["-l", level]
    if components:
        argv += ["--component-log-level", ",".join(components)]
    if options.concurrency:
        argv += ["--concurrency", str(options.concurrency)]
    return argv


def _json_ready(value: Any) -> Any:
    """Metadata as plain JSON types (ProxyConfig documents are read-only mappings)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"protocol": "TCP", "address": address, "port_value": port}}


def _file_log(path: str) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
        },
    }


def _endpoints(name: str, address: dict[str, Any]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
    }


def _tcp_cluster(name: str, host: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "alt_stat_name": f"{name};",
        "type": "STATIC",
        "connect_timeout": "0.250s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": _endpoints(name, _socket(host, port)),
    }


def _pipe_cluster(name: str, path: str) -> dict[str, Any]:
    return {
        "name": name,
        "alt_stat_name": f"{name};",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": _endpoints(name, {"pipe": {"path": path}}),
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def _http_listener(address: str, port: int, prefix: str, path: str, cluster: str) -> dict[str, Any]:
    manager = {
        "@type": f"{_HCM}.HttpConnectionManager",
        "codec_type": "AUTO",
        "stat_prefix": prefix,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "backend",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": path}, "route": {"cluster": cluster}}],
                }
            ]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "name": f"{address}_{port}",
        "address": _socket(address, port),
        "ignore_global_conn_limit": True,
        "bypass_overload_manager": True,
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }
