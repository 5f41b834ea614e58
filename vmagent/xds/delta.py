"""The agent's own part of a *delta* ADS stream (``DeltaAggregatedResources``): the NameTable
subscription, its ACK/NACK and health reports, as Istio's agent sends them in
``pkg/istio-agent/xds_proxy_delta.go`` (reference §3.2, §4.3). Pure: messages in, messages out.

- Opening: ``DeltaDiscoveryRequest{type_url: NameTable, node}`` (no names: wildcard), then the
  last health state (never health first: istiod ignores HealthInformation as a first message).
- Push: ``resources[0].resource`` unpacked as the whole table (replace, never merge); ACK
  ``{type_url, response_nonce}``, NACK the same plus ``error_detail{code: 13, message}``.
  An empty push changes nothing and is ACKed.
- Health: ``DeltaDiscoveryRequest{type_url: HealthInformation}``, ``error_detail{13, msg}`` when
  unhealthy (istiod ``delta.go`` reads the same fields as in SotW).
"""

from __future__ import annotations

from dataclasses import replace

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DeltaDiscoveryResponse
from google.rpc import status_pb2

from vmagent.dns.table import NameTableError
from vmagent.health import HealthEvent as Health
from vmagent.xds.session import (
    CODE_INTERNAL,
    HEALTH_TYPE,
    NAME_TABLE_TYPE,
    TablePush,
    decode_name_table_any,
)


def delta_health_request(health: Health) -> DeltaDiscoveryRequest:
    request = DeltaDiscoveryRequest(type_url=HEALTH_TYPE)
    if not health.healthy:
        request.error_detail.CopyFrom(
            status_pb2.Status(code=CODE_INTERNAL, message=health.message or "unhealthy")
        )
    return request


class DeltaAdsSession:
    """Protocol state of one delta stream (the NameTable part; other types go to the proxy)."""

    def __init__(self, node: base_pb2.Node) -> None:
        self.node = node
        self.accepted_version = ""
        self.accepted_nonce = ""

    def opening(self, last_health: Health | None) -> list[DeltaDiscoveryRequest]:
        first = DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE)
        first.node.CopyFrom(self.node)
        requests = [first]
        if last_health is not None:
            requests.append(delta_health_request(last_health))
        return requests

    def health_request(self, health: Health) -> DeltaDiscoveryRequest:
        return delta_health_request(health)

    def on_response(
        self, response: DeltaDiscoveryResponse
    ) -> TablePush | DeltaDiscoveryRequest | None:
        """A TablePush for NameTable pushes; an ACK for any other type (nobody else asked
        for it when no proxy relays the stream)."""
        reply = DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce)
        if response.type_url != NAME_TABLE_TYPE:
            return reply
        version = response.system_version_info
        if response.resources:
            version = response.resources[0].version or version
        if not response.resources:
            return TablePush(reply, None, version, None)
        try:
            table = decode_name_table_any(response.resources[0].resource)
        except (NameTableError, ValueError) as exc:
            return self.on_checked(response, str(exc))
        return replace(self.on_checked(response, None), table=table)

    def on_checked(self, response: DeltaDiscoveryResponse, error: str | None) -> TablePush:
        """The ACK (``error`` None) or NACK of a NameTable push checked elsewhere (by the
        table builder, ``vmagent.dns.tablebuild``); its ``table`` is None."""
        reply = DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE, response_nonce=response.nonce)
        version = response.system_version_info
        if response.resources:
            version = response.resources[0].version or version
        if error is not None:
            reply.error_detail.CopyFrom(status_pb2.Status(code=CODE_INTERNAL, message=error))
            return TablePush(reply, None, version, error)
        self.accepted_version = version
        self.accepted_nonce = response.nonce
        return TablePush(reply, None, version, None)
