"""One ADS stream's protocol, as Istio's agent speaks it to istiod (reference §3.2, §4.3):
what to send first, how to ACK/NACK NameTable pushes, how health is reported. Pure: messages
in, messages out; the shell owns the stream."""

from __future__ import annotations

from dataclasses import dataclass, replace

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
    Resource,
)
from google.protobuf import any_pb2, message, struct_pb2
from google.rpc import status_pb2

from vmagent._proto import nds_pb2
from vmagent.backoff import backoff_delay as backoff_delay  # re-exported for the shell
from vmagent.dns.ndstable import name_table_document as name_table_document  # re-exported
from vmagent.dns.ndstable import table_from_proto
from vmagent.dns.table import NameInfo, NameTableError
from vmagent.health import HealthEvent as Health
from vmagent.xds.node import NodeInfo

NAME_TABLE_TYPE = "type.googleapis.com/istio.networking.nds.v1.NameTable"
HEALTH_TYPE = "type.googleapis.com/istio.v1.HealthInformation"
CODE_INTERNAL = 13  # google.rpc.Code.INTERNAL, what Istio's agent NACKs and reports with


def node_message(node: NodeInfo) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update(dict(node.metadata))
    return base_pb2.Node(id=node.id, cluster=node.cluster, metadata=metadata)


def health_request(health: Health) -> DiscoveryRequest:
    """A bare HealthInformation request; unhealthy carries ``error_detail`` code 13."""
    request = DiscoveryRequest(type_url=HEALTH_TYPE)
    if not health.healthy:
        request.error_detail.CopyFrom(
            status_pb2.Status(code=CODE_INTERNAL, message=health.message or "unhealthy")
        )
    return request


def table_resource(
    response: DiscoveryResponse | DeltaDiscoveryResponse,
) -> any_pb2.Any | None:
    """The packed NameTable of a NameTable push (SotW ``resources[0]``, delta
    ``resources[0].resource``), undecoded; None for an empty push (nothing changes)."""
    if not response.resources:
        return None
    first = response.resources[0]
    packed: any_pb2.Any = first.resource if isinstance(first, Resource) else first
    return packed


def decode_name_table(response: DiscoveryResponse) -> dict[str, NameInfo]:
    """The whole table from ``resources[0]`` (Istio replaces the table, never merges)."""
    return decode_name_table_any(response.resources[0])


def decode_name_table_any(resource: any_pb2.Any) -> dict[str, NameInfo]:
    """A packed NameTable (SotW ``resources[0]``, delta ``resources[0].resource``);
    NameTableError when it is another type or does not decode."""
    if resource.type_url != NAME_TABLE_TYPE:
        raise NameTableError(f"unexpected resource type {resource.type_url!r}")
    table = nds_pb2.NameTable()
    try:
        unpacked = resource.Unpack(table)
    except message.DecodeError as exc:  # corrupt bytes: NACK, do not end the stream
        raise NameTableError(f"resource does not decode as a NameTable: {exc}") from None
    if not unpacked:
        raise NameTableError("resource does not decode as a NameTable")
    return table_from_proto(table)


@dataclass(frozen=True)
class TablePush:
    """A NameTable push handled: the reply to send, and the table when it was accepted."""

    reply: DiscoveryRequest | DeltaDiscoveryRequest
    table: dict[str, NameInfo] | None
    version: str
    error: str | None


class AdsSession:
    """Protocol state of one stream."""

    def __init__(self, node: base_pb2.Node) -> None:
        self.node = node
        self.accepted_version = ""
        self.accepted_nonce = ""

    def opening(self, last_health: Health | None) -> list[DiscoveryRequest]:
        """The NameTable request carries the node (never a health report first: istiod
        ignores HealthInformation as a stream's first message); then the last health state."""
        first = DiscoveryRequest(type_url=NAME_TABLE_TYPE)
        first.node.CopyFrom(self.node)
        requests = [first]
        if last_health is not None:
            requests.append(health_request(last_health))
        return requests

    def health_request(self, health: Health) -> DiscoveryRequest:
        return health_request(health)

    def on_response(self, response: DiscoveryResponse) -> TablePush | DiscoveryRequest | None:
        if response.type_url != NAME_TABLE_TYPE:
            # Not subscribed; ACK so the server does not wait on us.
            return DiscoveryRequest(
                type_url=response.type_url,
                version_info=response.version_info,
                response_nonce=response.nonce,
            )
        reply = DiscoveryRequest(type_url=NAME_TABLE_TYPE, response_nonce=response.nonce)
        if not response.resources:
            reply.version_info = response.version_info
            return TablePush(reply, None, response.version_info, None)
        try:
            table = decode_name_table(response)
        except (NameTableError, ValueError) as exc:
            return self.on_checked(response, str(exc))
        return replace(self.on_checked(response, None), table=table)

    def on_checked(self, response: DiscoveryResponse, error: str | None) -> TablePush:
        """The ACK (``error`` None) or NACK of a NameTable push that was checked elsewhere (by
        the table builder: ``vmagent.dns.tablebuild``); its ``table`` is None."""
        reply = DiscoveryRequest(type_url=NAME_TABLE_TYPE, response_nonce=response.nonce)
        if error is not None:
            reply.version_info = self.accepted_version
            reply.error_detail.CopyFrom(status_pb2.Status(code=CODE_INTERNAL, message=error))
            return TablePush(reply, None, response.version_info, error)
        self.accepted_version = reply.version_info = response.version_info
        self.accepted_nonce = response.nonce
        return TablePush(reply, None, response.version_info, None)
