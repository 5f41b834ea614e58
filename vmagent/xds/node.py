"""The xDS node as Istio's agent presents it (``pkg/istio-agent/agent.go``,
``pkg/bootstrap/config.go``): ID ``sidecar~IP~NAME.NS~NS.svc.DOMAIN``, cluster, and metadata
whose values use Istio's string forms. Pure: config and host facts in, node out."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmagent import __version__
from vmagent.config import Config

META_PREFIX = "ISTIO_META_"
METAJSON_PREFIX = "ISTIO_METAJSON_"
# The Istio release whose agent behaviour vmagent follows; istiod logs a warning without one.
ISTIO_VERSION = "1.24.0"


class NodeError(ValueError):
    """Node metadata that cannot be built (bad JSON in ISTIO_METAJSON_*, no usable IP)."""


@dataclass(frozen=True)
class NodeInfo:
    id: str
    cluster: str
    metadata: Mapping[str, Any]
    ips: tuple[str, ...]
    name: str
    namespace: str


def usable_ips(candidates: Sequence[str]) -> list[str]:
    """Addresses fit for INSTANCE_IPS: no loopback, link-local or unspecified addresses
    (a link-local IPv6 makes an invalid WorkloadEntry name, istio/istio#35343)."""
    out: list[str] = []
    for text in candidates:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if address.is_loopback or address.is_link_local or address.is_unspecified:
            continue
        if str(address) not in out:
            out.append(str(address))
    # IPv4 first, like Istio's ordering of the proxy's IPs.
    return sorted(out, key=lambda ip: ":" in ip)


def build_node(config: Config, hostname: str, host_ips: Sequence[str]) -> NodeInfo:
    """``host_ips`` are the host's addresses (used when ISTIO_SVC_IP is not set)."""
    if config.istio_svc_ip:
        ips = usable_ips([ip.strip() for ip in config.istio_svc_ip.split(",")]) or [
            config.istio_svc_ip.strip()
        ]
    else:
        ips = usable_ips(host_ips)
    if not ips:
        raise NodeError("no usable IP address for the node: set ISTIO_SVC_IP")
    namespace = config.namespace
    name = hostname.split(".", 1)[0] or "vm"
    domain = f"{namespace}.svc.{config.vmagent_cluster_domain}"
    node_id = f"sidecar~{ips[0]}~{name}.{namespace}~{domain}"

    metadata: dict[str, Any] = {}
    for key, value in sorted(config.dynamic.items()):
        if key.startswith(METAJSON_PREFIX):
            try:
                metadata[key[len(METAJSON_PREFIX) :]] = json.loads(value) if value else {}
            except json.JSONDecodeError as exc:
                raise NodeError(f"{key}: not valid JSON: {exc}") from None
        elif key.startswith(META_PREFIX):
            metadata[key[len(META_PREFIX) :]] = value
    proxy_config = dict(config.proxy_config.document)
    proxy_config.setdefault("discoveryAddress", config.proxy_config.discovery_address)
    metadata.update(
        {
            "NAMESPACE": namespace,
            "NAME": name,
            "SERVICE_ACCOUNT": config.service_account,
            "INSTANCE_IPS": ",".join(ips),
            "ISTIO_VERSION": ISTIO_VERSION,
            "CLUSTER_ID": config.istio_meta_cluster_id or metadata.get("CLUSTER_ID", ""),
            "DNS_CAPTURE": "true" if config.istio_meta_dns_capture else "false",
            "PROXY_CONFIG": proxy_config,
            "PILOT_SAN": [_host(config.proxy_config.discovery_address)],
            "VMAGENT_VERSION": __version__,
        }
    )
    if config.istio_meta_dns_capture:
        metadata["DNS_PROXY_ADDR"] = ",".join(config.dns_proxy_addr)
    return NodeInfo(
        node_id, _cluster(config, metadata, namespace), metadata, tuple(ips), name, namespace
    )


def _cluster(config: Config, metadata: Mapping[str, Any], namespace: str) -> str:
    """Istio's Node.cluster: serviceCluster, else app label, else workload name."""
    service_cluster = config.proxy_config.service_cluster
    if service_cluster and service_cluster != "istio-proxy":
        return service_cluster
    labels = metadata.get("LABELS")
    if isinstance(labels, Mapping) and labels.get("app"):
        return f"{labels['app']}.{namespace}"
    if metadata.get("WORKLOAD_NAME"):
        return f"{metadata['WORKLOAD_NAME']}.{namespace}"
    return f"istio-proxy.{namespace}"


def _host(address: str) -> str:
    if address.startswith("["):
        return address[1 : address.find("]")]
    return address.rsplit(":", 1)[0]
