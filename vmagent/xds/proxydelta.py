"""What the xDS proxy keeps of a delta upstream stream, per type: the subscription istiod has
for the connection (names, wildcard), the resources it sent (name -> ``Resource`` with its
version; ``removed_resources`` applied) and the last nonce. From that it answers a new Envoy
stream's first request of a type istiod already watches (istiod would send nothing: reference
§5.1, ``pilot/pkg/xds/delta.go`` ``shouldRespondDelta``). Pure; used by ``proxycore``.

Memory: one reference per resource istiod sent (the messages Envoy also received)."""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    Resource,
)

WILDCARD = "*"


def watched(request: DeltaDiscoveryRequest) -> tuple[set[str], bool]:
    """istiod's ``deltaWatchedResources`` for a first request: whether it is a wildcard
    subscription ("*" named, or nothing subscribed) and the names (subscribed plus those in
    ``initial_resource_versions``, minus unsubscribed). For a wildcard subscription only the
    explicitly subscribed names count: the held ones say what Envoy has, not what it wants,
    and diffing them would unsubscribe names from a wildcard watch."""
    subscribe = set(request.resource_names_subscribe)
    wildcard = WILDCARD in subscribe or not subscribe
    names = subscribe if wildcard else subscribe | set(request.initial_resource_versions)
    names = names - set(request.resource_names_unsubscribe) - {WILDCARD}
    return names, wildcard


@dataclass
class DeltaType:
    names: set[str] = field(default_factory=set)  # explicit names istiod has for this type
    wildcard: bool = False
    resources: dict[str, Resource] = field(default_factory=dict)
    system_version: str = ""
    nonce: str = ""  # last nonce istiod sent for this type
    unanswered: bool = False  # last response went to Envoy, no ACK/NACK seen yet

    def change(self, request: DeltaDiscoveryRequest) -> bool:
        """Apply Envoy's subscribe/unsubscribe lists; True if they name anything."""
        subscribe = set(request.resource_names_subscribe) - {WILDCARD}
        unsubscribe = set(request.resource_names_unsubscribe) - {WILDCARD}
        self.names = (self.names | subscribe) - unsubscribe
        if not self.wildcard:  # istiod sends no removal for names no longer watched
            for name in unsubscribe:
                self.resources.pop(name, None)
        return bool(request.resource_names_subscribe or request.resource_names_unsubscribe)


class DeltaTypes:
    def __init__(self, nonce_prefix: str) -> None:
        self.types: dict[str, DeltaType] = {}
        self._prefix = nonce_prefix
        self._replays = 0

    def count(self) -> int:
        return sum(len(state.resources) for state in self.types.values())

    def apply(self, response: DeltaDiscoveryResponse, *, sent: bool) -> None:
        """Keep what istiod sent; ``sent``: it is going to Envoy (which will ACK it)."""
        state = self.types.setdefault(response.type_url, DeltaType())
        for resource in response.resources:
            state.resources[resource.name] = resource
        for name in response.removed_resources:
            state.resources.pop(name, None)
        if response.system_version_info:
            state.system_version = response.system_version_info
        state.nonce = response.nonce
        state.unanswered = sent

    def release(self) -> list[DeltaDiscoveryRequest]:
        """ACKs for responses Envoy never answered (its stream ended)."""
        acks = []
        for type_url, state in sorted(self.types.items()):
            if state.unanswered:
                state.unanswered = False
                acks.append(DeltaDiscoveryRequest(type_url=type_url, response_nonce=state.nonce))
        return acks

    def first_request(
        self, request: DeltaDiscoveryRequest
    ) -> tuple[DeltaDiscoveryRequest | None, DeltaDiscoveryResponse | None]:
        """Envoy's first request of a type on its stream -> (what goes upstream, the agent's
        answer to Envoy). A type istiod does not watch yet: the request goes up as it is and
        istiod answers. A watched type: only the names added/removed go up (a spontaneous
        request), and the agent answers from what it kept: every kept resource Envoy wants
        whose version differs from ``initial_resource_versions``, and as removed every name
        Envoy holds that is gone."""
        state = self.types.get(request.type_url)
        names, wildcard = watched(request)
        if state is None:
            self.types[request.type_url] = DeltaType(names=names, wildcard=wildcard)
            return request, None
        before = set(state.names)
        added, gone = names - before, before - names
        change = None
        if added or gone:
            change = DeltaDiscoveryRequest(
                type_url=request.type_url,
                resource_names_subscribe=sorted(added),
                resource_names_unsubscribe=sorted(gone),
            )
            state.change(change)
        held = dict(request.initial_resource_versions)
        self._replays += 1
        replay = DeltaDiscoveryResponse(
            type_url=request.type_url,
            system_version_info=state.system_version,
            nonce=f"{self._prefix}{self._replays}",
            resources=[
                resource
                for name, resource in sorted(state.resources.items())
                if (wildcard or name in names) and held.get(name) != resource.version
            ],
            removed_resources=sorted(
                name
                for name in held
                if name not in state.resources and (wildcard or name in before)
            ),
        )
        return change, replay

    def later_request(self, request: DeltaDiscoveryRequest) -> DeltaDiscoveryRequest:
        """An ACK/NACK of an upstream response or a subscription change: forwarded. A change
        riding on a stale nonce goes up with no nonce, else istiod would drop the change."""
        state = self.types.setdefault(request.type_url, DeltaType())
        changed = state.change(request)
        nonce = request.response_nonce
        if nonce and nonce == state.nonce:
            state.unanswered = False
        if changed and nonce and nonce != state.nonce:
            spontaneous = DeltaDiscoveryRequest()
            spontaneous.CopyFrom(request)
            spontaneous.response_nonce = ""
            spontaneous.ClearField("error_detail")
            return spontaneous
        return request

    def subscription_change(self, request: DeltaDiscoveryRequest) -> DeltaDiscoveryRequest | None:
        """Envoy's answer to an agent replay: swallowed; a subscription change it carries goes
        up as a spontaneous request."""
        state = self.types.setdefault(request.type_url, DeltaType())
        if not state.change(request):
            return None
        return DeltaDiscoveryRequest(
            type_url=request.type_url,
            resource_names_subscribe=list(request.resource_names_subscribe),
            resource_names_unsubscribe=list(request.resource_names_unsubscribe),
        )
