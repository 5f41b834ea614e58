"""The xDS proxy's decisions: Envoy's ADS stream (downstream) carried on the agent's single
upstream stream to istiod. Pure: events in, :data:`Decision` lists out; the shell
(``vmagent/xds/proxy.py``) owns the sockets. Shapes follow Istio's ``pkg/istio-agent/
xds_proxy.go`` / ``xds_proxy_delta.go``, except that the upstream stream outlives Envoy.

Rules (reference §5, §5.1; istiod ``pkg/xds/server.go`` ``ShouldRespond``, ``pilot/pkg/xds/
delta.go`` ``shouldRespondDelta``):

- Envoy's requests go upstream without their node (the agent's opening message carried it);
  NameTable/HealthInformation requests from Envoy are dropped (the agent owns them).
- Upstream responses of a type Envoy asked for on its current stream go to Envoy; any other
  response (no Envoy, type not yet asked for, not an ``envoy.`` type) is ACKed by the agent.
  When Envoy goes away, responses it never answered are ACKed by the agent.
- **SotW**: a restarted Envoy's requests carry an empty nonce, which istiod treats as INIT and
  answers in full: forward them. Agent ACKs repeat the type's last ``resource_names`` (an empty
  list would unsubscribe a non-wildcard type: ``shouldUnsubscribe``).
- **Delta**: istiod answers nothing to a re-request of a watched type with unchanged names, so
  the agent keeps every type's resources (name -> Resource with version; removals applied) and
  answers Envoy's first request of a type already watched upstream itself, with an agent nonce
  (:data:`AGENT_NONCE_PREFIX`) whose ACK/NACK it swallows. Only subscription changes (names
  added/removed) travel upstream, as spontaneous requests (empty nonce: a stale nonce would make
  istiod drop the change).
- Upstream stream lost: a downstream that used it is closed (Envoy reconnects and re-requests
  everything on the next upstream stream). Requests of a downstream that has not used an
  upstream yet wait (at most :data:`MAX_BUFFERED`) for the next one.
- A downstream of the other kind makes the agent reopen its upstream in that kind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TypeAlias

from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)

from vmagent.xds.proxydelta import DeltaTypes
from vmagent.xds.session import HEALTH_TYPE, NAME_TABLE_TYPE

SOTW = "sotw"
DELTA = "delta"
KINDS = (SOTW, DELTA)
AGENT_NONCE_PREFIX = "vmagent-"
MAX_BUFFERED = 10_000  # requests of a downstream waiting for an upstream stream
ENVOY_PREFIX = "type.googleapis.com/envoy."
WORKLOAD_TYPE = "type.googleapis.com/istio.workload.Workload"
AGENT_TYPES = (NAME_TABLE_TYPE, HEALTH_TYPE)

Request: TypeAlias = DiscoveryRequest | DeltaDiscoveryRequest
Response: TypeAlias = DiscoveryResponse | DeltaDiscoveryResponse


@dataclass(frozen=True)
class ToUpstream:
    request: Request


@dataclass(frozen=True)
class ToDownstream:
    stream: int
    response: Response


@dataclass(frozen=True)
class CloseDownstream:
    """End the downstream stream with UNAVAILABLE and ``reason`` (Envoy reconnects)."""

    stream: int
    reason: str


@dataclass(frozen=True)
class ReopenUpstream:
    kind: str
    reason: str


@dataclass(frozen=True)
class Note:
    """A log line: ``level`` is a :mod:`logging` level."""

    level: int
    text: str


Decision: TypeAlias = ToUpstream | ToDownstream | CloseDownstream | ReopenUpstream | Note


def forwardable(type_url: str) -> bool:
    """Istio's agent forwards only Envoy types (and ``istio.workload.Workload``)."""
    return type_url.startswith(ENVOY_PREFIX) or type_url == WORKLOAD_TYPE


def without_node(request: Request) -> Request:
    if not request.HasField("node"):
        return request
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("node")
    return copy


@dataclass
class SotwType:
    names: list[str] = field(default_factory=list)  # last resource_names sent upstream
    nonce: str = ""  # last response nonce from upstream
    version: str = ""
    unanswered: bool = False  # the last response went to Envoy, which has not answered yet


@dataclass
class Downstream:
    stream: int
    kind: str
    bound: bool = False  # has sent something on the current upstream stream
    types: set[str] = field(default_factory=set)  # types requested on this stream
    waiting: list[Request] = field(default_factory=list)


@dataclass
class ProxyStats:
    downstreams: int = 0
    forwarded_requests: int = 0
    forwarded_responses: int = 0
    agent_acks: int = 0
    replays: int = 0
    replay_nacks: int = 0
    last_replay_nack: str | None = None
    upstream_reopens: int = 0


class ProxyCore:
    """State of the proxy: the wanted upstream kind, whether an upstream stream is open, per
    type state of that stream, and the one downstream stream (ids are the shell's)."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"xDS stream kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind  # what the upstream stream should be
        self.upstream_kind: str | None = None  # what it is; None while there is none
        self.down: Downstream | None = None
        self.sotw: dict[str, SotwType] = {}
        self.delta = DeltaTypes(AGENT_NONCE_PREFIX)
        self.stats = ProxyStats()

    # -- upstream events --------------------------------------------------------------
    def upstream_opened(self, kind: str) -> list[Decision]:
        """A new upstream stream of ``kind`` is open (its NDS/health opening already queued)."""
        self.upstream_kind = kind
        self.sotw = {}
        self.delta = DeltaTypes(AGENT_NONCE_PREFIX)
        out: list[Decision] = []
        down = self.down
        if down is None:
            return out
        if down.bound:  # belongs to an older stream (normally closed in upstream_closed)
            return self._close(down, "control-plane stream reopened")
        if down.kind != kind:
            return [ReopenUpstream(down.kind, f"Envoy speaks {down.kind} ADS")]
        waiting, down.waiting = down.waiting, []
        for request in waiting:
            out.extend(self.downstream_request(down.stream, request))
        return out

    def upstream_closed(self) -> list[Decision]:
        self.upstream_kind = None
        down = self.down
        if down is not None and down.bound:
            return self._close(down, "control-plane stream closed; reconnect to re-request")
        return []

    def upstream_response(self, response: Response) -> list[Decision]:
        """A response of any type but NameTable (the client's session keeps those)."""
        down = self.down
        to_envoy = (
            down is not None
            and down.bound
            and response.type_url in down.types
            and forwardable(response.type_url)
        )
        out: list[Decision] = []
        if not forwardable(response.type_url):
            out.append(Note(logging.DEBUG, f"xds proxy: not forwarding {response.type_url}"))
        if isinstance(response, DeltaDiscoveryResponse):
            self.delta.apply(response, sent=to_envoy)
            ack: Request = DeltaDiscoveryRequest(
                type_url=response.type_url, response_nonce=response.nonce
            )
        else:
            state = self.sotw.setdefault(response.type_url, SotwType())
            state.nonce, state.version = response.nonce, response.version_info
            state.unanswered = to_envoy
            ack = self._sotw_ack(response.type_url, state)
        if to_envoy and down is not None:
            self.stats.forwarded_responses += 1
            out.append(ToDownstream(down.stream, response))
        else:
            self.stats.agent_acks += 1
            out.append(ToUpstream(ack))
        return out

    # -- downstream events ------------------------------------------------------------
    def downstream_opened(self, stream: int, kind: str) -> list[Decision]:
        out: list[Decision] = []
        if self.down is not None:
            old = self.down
            out.extend(self.downstream_closed(old.stream))
            out.append(CloseDownstream(old.stream, "replaced by a newer Envoy stream"))
        self.stats.downstreams += 1
        self.down = Downstream(stream, kind)
        if kind != self.kind:
            self.kind = kind
            self.stats.upstream_reopens += 1
            reason = f"Envoy connected with {kind} ADS; reopening the upstream stream as {kind}"
            out += [Note(logging.WARNING, f"xds proxy: {reason}"), ReopenUpstream(kind, reason)]
        return out

    def downstream_closed(self, stream: int) -> list[Decision]:
        """Envoy's stream ended; the agent ACKs what Envoy never answered and keeps the
        upstream subscriptions (istiod must not notice)."""
        down = self.down
        if down is None or down.stream != stream:
            return []
        self.down = None
        if not down.bound or self.upstream_kind is None:
            return []
        out: list[Decision] = []
        for type_url, state in sorted(self.sotw.items()):
            if state.unanswered:
                state.unanswered = False
                out.append(ToUpstream(self._sotw_ack(type_url, state)))
        out.extend(ToUpstream(ack) for ack in self.delta.release())
        self.stats.agent_acks += len(out)
        return out

    def downstream_request(self, stream: int, request: Request) -> list[Decision]:
        down = self.down
        if down is None or down.stream != stream:
            return []
        if request.type_url in AGENT_TYPES:
            return [Note(logging.DEBUG, f"xds proxy: dropped Envoy's {request.type_url}")]
        if self.upstream_kind is None or self.upstream_kind != down.kind:
            if len(down.waiting) >= MAX_BUFFERED:
                return self._close(down, "too many requests while the control plane is away")
            down.waiting.append(request)
            return []
        down.bound = True
        request = without_node(request)
        if isinstance(request, DeltaDiscoveryRequest):
            return self._delta_request(down, request)
        return self._sotw_request(down, request)

    # -- internals --------------------------------------------------------------------
    def _sotw_request(self, down: Downstream, request: DiscoveryRequest) -> list[Decision]:
        down.types.add(request.type_url)
        state = self.sotw.setdefault(request.type_url, SotwType())
        state.names = list(request.resource_names)
        if request.response_nonce and request.response_nonce == state.nonce:
            state.unanswered = False
        self.stats.forwarded_requests += 1
        return [ToUpstream(request)]

    def _delta_request(self, down: Downstream, request: DeltaDiscoveryRequest) -> list[Decision]:
        out: list[Decision] = []
        first = request.type_url not in down.types
        down.types.add(request.type_url)
        if request.response_nonce.startswith(AGENT_NONCE_PREFIX):
            if request.HasField("error_detail"):
                self.stats.replay_nacks += 1
                self.stats.last_replay_nack = request.error_detail.message
                out.append(
                    Note(
                        logging.ERROR,
                        f"xds proxy: Envoy rejected replayed {request.type_url}: "
                        f"{request.error_detail.message}",
                    )
                )
            change = self.delta.subscription_change(request)
        elif first:
            forward, replay = self.delta.first_request(request)
            change = forward
            if replay is not None:
                self.stats.replays += 1
                out.append(ToDownstream(down.stream, replay))
        else:
            change = self.delta.later_request(request)
        if change is not None:
            self.stats.forwarded_requests += 1
            out.insert(0, ToUpstream(change))
        return out

    def _sotw_ack(self, type_url: str, state: SotwType) -> DiscoveryRequest:
        return DiscoveryRequest(
            type_url=type_url,
            version_info=state.version,
            response_nonce=state.nonce,
            resource_names=state.names,
        )

    def _close(self, down: Downstream, reason: str) -> list[Decision]:
        out = self.downstream_closed(down.stream)
        return [*out, CloseDownstream(down.stream, reason)]

    def snapshot(self) -> dict[str, object]:
        s = self.stats
        return {
            "kind": self.kind,
            "upstream_kind": self.upstream_kind,
            "envoy_connected": self.down is not None,
            "downstreams": s.downstreams,
            "forwarded_requests": s.forwarded_requests,
            "forwarded_responses": s.forwarded_responses,
            "agent_acks": s.agent_acks,
            "replays": s.replays,
            "replay_nacks": s.replay_nacks,
            "last_replay_nack": s.last_replay_nack,
            "upstream_reopens": s.upstream_reopens,
            "kept_resources": self.delta.count(),
        }
