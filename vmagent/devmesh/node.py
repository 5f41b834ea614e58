"""The proxy behind an xDS stream, read from its Envoy ``Node`` the way istiod reads it
(``pilot/pkg/model/context.go``: ``ParseServiceNodeWithMetadata``, ``ParseMetadata``)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

NODE_TYPES = ("sidecar", "router", "waypoint", "ztunnel")


class NodeError(ValueError):
    """The node cannot be used (istiod answers INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class ProxyNode:
    id: str
    type: str
    ips: tuple[str, ...]
    name: str  # the id part before the first '.', i.e. POD_NAME
    namespace: str
    domain: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    locality: str = ""

    def meta(self, key: str) -> str:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else ""

    @property
    def network(self) -> str:
        return self.meta("NETWORK")

    @property
    def cluster_id(self) -> str:
        return self.meta("CLUSTER_ID")

    @property
    def auto_register_group(self) -> str:
        return self.meta("AUTO_REGISTER_GROUP")

    @property
    def dns_capture(self) -> bool:
        return self.meta("DNS_CAPTURE").lower() == "true"

    @property
    def dns_auto_allocate(self) -> bool | None:
        value = self.meta("DNS_AUTO_ALLOCATE").lower()
        return None if not value else value == "true"

    @property
    def labels(self) -> dict[str, str]:
        value = self.metadata.get("LABELS")
        if isinstance(value, Mapping):
            return {str(k): str(v) for k, v in value.items()}
        return {}

    @property
    def has_readiness_probe(self) -> bool:
        """``PROXY_CONFIG.readinessProbe`` set (a JSON object or its string form)."""
        config = self.metadata.get("PROXY_CONFIG")
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except ValueError:
                return False
        return isinstance(config, Mapping) and bool(config.get("readinessProbe"))

    @property
    def v4(self) -> bool:
        return any(ipaddress.ip_address(ip).version == 4 for ip in self.ips)

    @property
    def v6(self) -> bool:
        return any(ipaddress.ip_address(ip).version == 6 for ip in self.ips)


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _locality(node: Any) -> str:
    parts = [node.locality.region, node.locality.zone, node.locality.sub_zone]
    while parts and not parts[-1]:
        parts.pop()
    return "/".join(parts)


def parse_node(node: Any) -> ProxyNode:
    """An ``envoy.config.core.v3.Node`` → :class:`ProxyNode`; raises :class:`NodeError`."""
    if node is None or not node.id:
        raise NodeError("missing node information")
    parts = node.id.split("~")
    if len(parts) != 4:
        raise NodeError(f"missing parts in the service node {node.id!r}")
    kind, ip, ident, domain = parts
    if kind not in NODE_TYPES:
        raise NodeError(f"invalid node type (valid types: {', '.join(NODE_TYPES)}) in {node.id!r}")
    metadata: dict[str, Any] = (
        json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
    )
    instance_ips = metadata.get("INSTANCE_IPS")
    ips: tuple[str, ...] = ()
    if isinstance(instance_ips, str) and instance_ips:
        candidates = tuple(i.strip() for i in instance_ips.split(","))
        if all(_valid_ip(i) for i in candidates):
            ips = candidates
    if not ips:
        if not _valid_ip(ip):
            raise NodeError(f"invalid IP address {ip!r} in {node.id!r}")
        ips = (ip,)
    namespace = metadata.get("NAMESPACE")
    if not isinstance(namespace, str) or not namespace:
        namespace = domain.split(".")[0] if domain else ""
    return ProxyNode(
        id=node.id,
        type=kind,
        ips=ips,
        name=ident.split(".")[0],
        namespace=namespace,
        domain=domain,
        metadata=metadata,
        locality=_locality(node),
    )
