"""One ADS stream's protocol state (state of the world), as istiod keeps it: what was sent,
what was ACKed or NACKed, and what each request asks for. Pure: requests and ``now`` go in,
decisions come out; the asyncio shell (:mod:`vmagent.devmesh.ads`) does the I/O.

istiod's rules (``pilot/pkg/xds/ads.go``, ``pkg/xds/server.go`` ``ShouldRespond``):
HealthInformation is a report, never answered; a request with ``error_detail`` is a NACK
(recorded, not answered); an empty nonce, or a nonce for a type this stream never got, asks
for a response; a nonce other than the last one sent is stale and ignored; the matching nonce
is an ACK, answered only when the requested names changed (for EDS/RDS, only when names were
added). An empty name list for EDS/RDS unsubscribes the type (``shouldUnsubscribe``). A CDS
INIT makes the next EDS request be answered even if it looks like an ACK, so Envoy can finish
warming its clusters (``WarmingDependencies``, envoyproxy/envoy#13009).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from vmagent.devmesh.node import ProxyNode
from vmagent.devmesh.registry import rfc3339nano
from vmagent.xds.session import HEALTH_TYPE, NAME_TABLE_TYPE

# The type URLs are the agent's: one definition for both ends of the stream.
NAME_TABLE = NAME_TABLE_TYPE
HEALTH_INFO = HEALTH_TYPE
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# Not wildcard by the xDS spec (istiod ``IsWildcardTypeURL``): EDS, RDS, SDS, ECDS.
NON_WILDCARD_TYPES = (
    ENDPOINT_TYPE,
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
)


@dataclass(frozen=True)
class Respond:
    type_url: str


@dataclass(frozen=True)
class Ack:
    type_url: str
    version: str


@dataclass(frozen=True)
class Nack:
    type_url: str
    version: str
    nonce: str
    message: str


@dataclass(frozen=True)
class Stale:
    type_url: str
    nonce: str


@dataclass(frozen=True)
class Health:
    healthy: bool
    message: str


Decision = Respond | Ack | Nack | Stale | Health


@dataclass(frozen=True)
class NackRecord:
    version: str
    nonce: str
    code: int
    message: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "nonce": self.nonce,
            "code": self.code,
            "message": self.message,
            "at": rfc3339nano(self.at),
        }


@dataclass
class Watch:
    names: tuple[str, ...] = ()
    sent_version: str = ""
    sent_nonce: str = ""
    sent_at: float | None = None
    sent_payload: bytes | None = None
    acked_version: str = ""
    acked_nonce: str = ""
    nacks: list[NackRecord] = field(default_factory=list)
    always_respond: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "sentVersion": self.sent_version,
            "sentNonce": self.sent_nonce,
            "sentAt": rfc3339nano(self.sent_at) if self.sent_at is not None else None,
            "ackedVersion": self.acked_version,
            "ackedNonce": self.acked_nonce,
            "nacks": [n.to_dict() for n in self.nacks],
        }


class Session:
    MAX_NACKS = 20  # kept per type for the debug output

    def __init__(self, stream_id: str, peer: str, now: float) -> None:
        self.id = stream_id
        self.peer = peer
        self.connected_at = now
        self.node: ProxyNode | None = None
        self.identity: str | None = None  # verified client-certificate SPIFFE ID, if any
        self.watches: dict[str, Watch] = {}
        self.health: tuple[bool, str, float] | None = None
        self._counter = 0

    def receive(self, request: discovery_pb2.DiscoveryRequest, now: float) -> Decision:
        """Classify a request after the first (node-carrying) one has been accepted."""
        type_url = request.type_url
        if type_url == HEALTH_INFO:
            healthy = not request.HasField("error_detail")
            message = "" if healthy else request.error_detail.message
            self.health = (healthy, message, now)
            return Health(healthy, message)
        watch = self.watches.get(type_url)
        if request.HasField("error_detail"):
            record = NackRecord(
                request.version_info,
                request.response_nonce,
                request.error_detail.code,
                request.error_detail.message,
                now,
            )
            if watch is not None:
                watch.nacks = [*watch.nacks, record][-self.MAX_NACKS :]
            return Nack(type_url, request.version_info, request.response_nonce, record.message)
        names = tuple(sorted(request.resource_names))
        if not names and type_url in NON_WILDCARD_TYPES:
            self.watches.pop(type_url, None)  # Envoy no longer needs any: unsubscribe
            return Ack(type_url, request.version_info)
        if not request.response_nonce or watch is None:
            self.watches[type_url] = watch or Watch()
            self.watches[type_url].names = names
            if type_url == CLUSTER_TYPE and ENDPOINT_TYPE in self.watches:
                self.watches[ENDPOINT_TYPE].always_respond = True
            return Respond(type_url)
        if request.response_nonce != watch.sent_nonce:
            return Stale(type_url, request.response_nonce)
        watch.acked_version, watch.acked_nonce = request.version_info, request.response_nonce
        previous, watch.names = watch.names, names
        always, watch.always_respond = watch.always_respond, False
        if always:
            return Respond(type_url)
        added = set(names) - set(previous)
        if set(names) == set(previous) or (type_url in NON_WILDCARD_TYPES and not added):
            return Ack(type_url, request.version_info)
        return Respond(type_url)

    def response(
        self,
        type_url: str,
        resources: Sequence[any_pb2.Any],
        now: float,
        payload: bytes | None = None,
    ) -> discovery_pb2.DiscoveryResponse:
        """A response with a fresh version and nonce, recorded as sent. ``payload`` is what the
        shell compares to decide whether a later push changes anything."""
        self._counter += 1
        version = f"{rfc3339nano(now)}/{self._counter}"
        nonce = f"{self.id}-{self._counter}"
        watch = self.watches.setdefault(type_url, Watch())
        watch.sent_version, watch.sent_nonce, watch.sent_at = version, nonce, now
        watch.sent_payload = payload
        return discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=nonce, resources=list(resources)
        )

    def to_dict(self) -> dict[str, Any]:
        node = self.node
        out: dict[str, Any] = {
            "stream": self.id,
            "peer": self.peer,
            "identity": self.identity,
            "connectedAt": rfc3339nano(self.connected_at),
            "node": node.id if node else None,
            "namespace": node.namespace if node else None,
            "ips": list(node.ips) if node else [],
            "metadata": dict(node.metadata) if node else {},
            "watches": {k: w.to_dict() for k, w in sorted(self.watches.items())},
        }
        if self.health is not None:
            healthy, message, at = self.health
            out["lastHealth"] = {"healthy": healthy, "message": message, "at": rfc3339nano(at)}
        return out
