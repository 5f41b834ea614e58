"""One delta ADS stream's protocol state (``DeltaAggregatedResources``), as istiod keeps it.
Pure: requests, resources and ``now`` go in; decisions and responses come out.

istiod's rules (``pilot/pkg/xds/delta.go``: ``shouldRespondDelta``, ``deltaWatchedResources``,
``pushDeltaXds``; reference §5.1):

- HealthInformation is a report, never answered (as in state of the world).
- ``error_detail`` is a NACK: recorded, not answered.
- A type not watched yet on this stream is an INIT (empty nonce or not): the subscription is
  the subscribe list plus ``initial_resource_versions``; an empty list on a wildcard type
  (LDS, CDS, and Istio's own types such as NameTable) or ``*`` means wildcard. Answered with
  the full set; names the client said it had that no longer exist are ``removed_resources``.
- A non-empty nonce other than the last one sent is stale: ignored.
- Otherwise (ACK, or a spontaneous request with an empty nonce on a watched type) the
  subscribe/unsubscribe lists are merged. If the set of names did not change, nothing is sent
  (unless a warming dependency set ``always_respond``: EDS after a CDS INIT), so a restarted
  Envoy re-sending its wildcard LDS/CDS on the same stream gets **no** answer. If names were
  added, only those are sent (names that do not exist come back in ``removed_resources``);
  unsubscribing alone is not answered.
- Pushes send only resources whose version differs from what the client has, and remove the
  ones that are gone; nothing changed means no response. Resource versions are content hashes
  (:func:`vmagent.devmesh.dataplane.pack`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from vmagent.devmesh.dataplane import CLUSTER, ENDPOINT, Resource
from vmagent.devmesh.registry import rfc3339nano
from vmagent.devmesh.session import (
    HEALTH_INFO,
    NON_WILDCARD_TYPES,
    Ack,
    Health,
    Nack,
    NackRecord,
    Respond,
    Session,
    Stale,
    Watch,
)


@dataclass(frozen=True)
class RespondNames:
    """Answer with only ``names`` (newly subscribed)."""

    type_url: str
    names: tuple[str, ...]


DeltaDecision = Respond | RespondNames | Ack | Nack | Stale | Health


@dataclass
class DeltaWatch(Watch):
    wildcard: bool = False
    subscribed: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)  # name -> version the client holds

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(wildcard=self.wildcard, names=sorted(self.subscribed),
                   resources=dict(sorted(self.known.items())))  # fmt: skip
        return out


def _merge(
    existing: set[str], request: discovery_pb2.DeltaDiscoveryRequest
) -> tuple[set[str], bool, bool, list[str]]:
    """istiod's ``deltaWatchedResources``: (names, wildcard, changed, newly added names)."""
    names = set(existing)
    added = []
    for name in [*request.resource_names_subscribe, *request.initial_resource_versions]:
        if name not in names:
            names.add(name)
            added.append(name)
    changed = bool(added)
    for name in request.resource_names_unsubscribe:
        if name in names:
            names.discard(name)
            changed = True
    wildcard = "*" in names or not request.resource_names_subscribe
    names.discard("*")
    return names, wildcard, changed, [n for n in added if n != "*"]


class DeltaSession(Session):
    """A delta stream: :class:`Session`'s identity, health and debug view, delta watches."""

    def watch(self, type_url: str) -> DeltaWatch | None:
        watch = self.watches.get(type_url)
        return watch if isinstance(watch, DeltaWatch) else None

    def receive_delta(
        self, request: discovery_pb2.DeltaDiscoveryRequest, now: float
    ) -> DeltaDecision:
        """Classify a request after the first (node-carrying) one has been accepted."""
        type_url = request.type_url
        if type_url == HEALTH_INFO:
            healthy = not request.HasField("error_detail")
            message = "" if healthy else request.error_detail.message
            self.health = (healthy, message, now)
            return Health(healthy, message)
        watch = self.watch(type_url)
        if request.HasField("error_detail"):
            record = NackRecord("", request.response_nonce, request.error_detail.code,
                                request.error_detail.message, now)  # fmt: skip
            if watch is not None:
                watch.nacks = [*watch.nacks, record][-self.MAX_NACKS :]
            return Nack(type_url, "", request.response_nonce, record.message)
        if watch is None:
            names, wildcard, _, _ = _merge(set(), request)
            watch = DeltaWatch(wildcard=wildcard and type_url not in NON_WILDCARD_TYPES)
            watch.subscribed = names
            watch.known = dict(request.initial_resource_versions)
            watch.names = tuple(sorted(names))
            self.watches[type_url] = watch
            if type_url == CLUSTER:
                endpoints = self.watch(ENDPOINT)
                if endpoints is not None:
                    endpoints.always_respond = True
            return Respond(type_url)
        if request.response_nonce and request.response_nonce != watch.sent_nonce:
            return Stale(type_url, request.response_nonce)
        names, _, changed, added = _merge(watch.subscribed, request)
        watch.subscribed, watch.names = names, tuple(sorted(names))
        for name in request.resource_names_unsubscribe:
            watch.known.pop(name, None)  # the client forgets what it unsubscribes
        if request.response_nonce:
            watch.acked_nonce = request.response_nonce
        always, watch.always_respond = watch.always_respond, False
        if not changed:
            return Respond(type_url) if always else Ack(type_url, "")
        if not added:
            return Ack(type_url, "")
        return RespondNames(type_url, tuple(added))

    def delta_response(
        self,
        type_url: str,
        current: Mapping[str, Resource],
        now: float,
        *,
        names: tuple[str, ...] | None = None,
        full: bool = False,
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        """The response for ``type_url`` given the resources that exist now (all of them, for
        this proxy), or None when there is nothing to send.

        ``names``: answer a subscription to these names only. ``full``: send every subscribed
        resource (INIT, forced warming). Otherwise a push: what changed since the client's
        versions, plus removals."""
        watch = self.watch(type_url)
        if watch is None:
            return None
        if watch.wildcard:
            wanted = dict(current)
        else:
            wanted = {n: current[n] for n in watch.subscribed if n in current}
        if names is not None:
            send = [current[n] for n in names if n in current]
            removed = [n for n in names if n not in current]
        else:
            send = [r for n, r in sorted(wanted.items()) if full or watch.known.get(n) != r.version]
            removed = sorted(n for n in watch.known if n not in wanted)
            if not full and not send and not removed:
                return None
        self._counter += 1
        version = f"{rfc3339nano(now)}/{self._counter}"
        nonce = f"{self.id}-{self._counter}"
        watch.sent_version, watch.sent_nonce, watch.sent_at = version, nonce, now
        for resource in send:
            watch.known[resource.name] = resource.version
        for name in removed:
            watch.known.pop(name, None)
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=type_url,
            nonce=nonce,
            resources=[
                discovery_pb2.Resource(name=r.name, version=r.version, resource=r.any) for r in send
            ],
            removed_resources=removed,
        )
