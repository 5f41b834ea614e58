"""WorkloadEntry auto-registration, as istiod's ``pilot/pkg/autoregistration/controller.go``
does it, as a pure state machine: every call takes ``now`` (seconds since the epoch).

- A stream whose node has ``AUTO_REGISTER_GROUP`` registers WorkloadEntry
  ``<group>-<first IP, ':'→'-'>[-<NETWORK>]`` (its last 253 characters) in the node's
  ``NAMESPACE``, created from the WorkloadGroup; a missing group is ``FAILED_PRECONDITION``.
- Streams are counted per proxy; when the last one closes the entry gets
  ``istio.io/disconnectedAt`` and is deleted ``grace`` seconds later unless the proxy reconnects.
- HealthInformation sets the ``Healthy`` condition.
- Entries whose WorkloadGroup disappears from the config are deleted (the owner reference's
  cascade in Kubernetes). When the group comes back, the proxies still connected with it are
  registered again at once, with their last health report (istio/istio#45329, fixed by
  istio/istio#44709 "auto-register connected proxies at WorkloadGroup creation"), instead of
  waiting for their next reconnect.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vmagent.devmesh.node import ProxyNode
from vmagent.devmesh.services import MeshConfig, WorkloadGroup

GROUP_ANNOTATION = "istio.io/autoRegistrationGroup"
CONTROLLER_ANNOTATION = "istio.io/workloadController"
CONNECTED_AT = "istio.io/connectedAt"
DISCONNECTED_AT = "istio.io/disconnectedAt"
HEALTH_CHECKS_ANNOTATION = "proxy.istio.io/health-checks-enabled"
DEFAULT_GRACE = 10.0


def rfc3339nano(when: float) -> str:
    """Go's ``time.RFC3339Nano`` in UTC (trailing zeros of the fraction dropped)."""
    moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


class RegistrationError(Exception):
    """Registration refused; ``code`` is the gRPC status name istiod would return."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Condition:
    status: bool
    message: str
    last_probe_time: float
    last_transition_time: float

    def to_dict(self) -> dict[str, str]:
        return {
            "type": "Healthy",
            "status": "True" if self.status else "False",
            "message": self.message,
            "lastProbeTime": rfc3339nano(self.last_probe_time),
            "lastTransitionTime": rfc3339nano(self.last_transition_time),
        }


@dataclass(frozen=True)
class WorkloadEntry:
    name: str
    namespace: str
    address: str
    group: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)
    network: str = ""
    locality: str = ""
    service_account: str = ""
    weight: int = 0
    condition: Condition | None = None
    delete_at: float | None = None

    @property
    def healthy(self) -> bool:
        """Whether the entry takes traffic (istiod: health counts only with the annotation)."""
        if self.annotations.get(HEALTH_CHECKS_ANNOTATION) != "true":
            return True
        return self.condition is not None and self.condition.status

    def to_dict(self) -> dict[str, Any]:
        """Kubernetes-shaped, for ``/debug/registry``."""
        spec: dict[str, Any] = {"address": self.address, "labels": dict(self.labels)}
        for key, value in (
            ("ports", dict(self.ports)),
            ("network", self.network),
            ("locality", self.locality),
            ("serviceAccount", self.service_account),
            ("weight", self.weight),
        ):
            if value:
                spec[key] = value
        status = {"conditions": [self.condition.to_dict()]} if self.condition else {}
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": dict(self.labels),
                "annotations": dict(self.annotations),
                "ownerReferences": [
                    {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
                     "name": self.group, "controller": True}
                ],
            },
            "spec": spec,
            "status": status,
            "healthy": self.healthy,
        }  # fmt: skip


def _condition(previous: Condition | None, report: tuple[bool, str, float]) -> Condition:
    """The ``Healthy`` condition after a report (istiod keeps the transition time while the
    status stays the same; a healthy report carries no message)."""
    healthy, message, at = report
    same = previous is not None and previous.status == healthy
    transition = previous.last_transition_time if previous is not None and same else at
    return Condition(healthy, "" if healthy else message, at, transition)


def entry_name(node: ProxyNode) -> str:
    """``autoregisteredWorkloadEntryName``: empty without a group, IP or namespace."""
    if not node.auto_register_group or not node.ips or not node.namespace:
        return ""
    parts = [node.auto_register_group, node.ips[0].replace(":", "-")]
    if node.network:
        parts.append(node.network)
    return "-".join(parts)[-253:]


def entry_from_group(
    name: str, node: ProxyNode, group: WorkloadGroup, controller: str, now: float
) -> WorkloadEntry:
    """``workloadEntryFromGroup`` plus the connect annotations."""
    labels = {**group.template_labels, **group.labels, **node.labels}
    labels.pop("istio-locality", None)
    annotations = {GROUP_ANNOTATION: group.name, **group.annotations}
    if node.has_readiness_probe or group.probe is not None:
        annotations[HEALTH_CHECKS_ANNOTATION] = "true"
    annotations[CONTROLLER_ANNOTATION] = controller
    annotations[CONNECTED_AT] = rfc3339nano(now)
    return WorkloadEntry(
        name=name,
        namespace=node.namespace,
        address=node.ips[0],
        group=group.name,
        labels=labels,
        annotations=annotations,
        ports=dict(group.ports),
        network=node.network or group.network,
        locality=node.locality or group.locality,
        service_account=group.service_account,
        weight=group.weight,
    )


@dataclass
class _Stream:
    key: tuple[str, str]  # (namespace, entry name)
    proxy_key: str
    connected_at: float
    node: ProxyNode
    health: tuple[bool, str, float] | None = None  # last report: healthy, message, when


class Registry:
    """All auto-registered WorkloadEntries and the streams that hold them."""

    def __init__(self, grace: float = DEFAULT_GRACE, controller: str = "devmesh") -> None:
        self.grace = grace
        self.controller = controller
        self._entries: dict[tuple[str, str], WorkloadEntry] = {}
        self._streams: dict[str, _Stream] = {}
        self._counts: dict[str, int] = {}
        self.generation = 0  # bumped on every change, so callers know when to recompute

    def entries(self) -> tuple[WorkloadEntry, ...]:
        return tuple(self._entries[k] for k in sorted(self._entries))

    def get(self, namespace: str, name: str) -> WorkloadEntry | None:
        return self._entries.get((namespace, name))

    def entry_of(self, stream: str) -> WorkloadEntry | None:
        held = self._streams.get(stream)
        return self._entries.get(held.key) if held else None

    def _put(self, entry: WorkloadEntry) -> None:
        self._entries[(entry.namespace, entry.name)] = entry
        self.generation += 1

    def connect(
        self, stream: str, node: ProxyNode, config: MeshConfig, now: float
    ) -> WorkloadEntry | None:
        """Register (or re-attach) the proxy of a new stream; ``None`` if it does not register."""
        name = entry_name(node)
        if not name:
            return None
        key = (node.namespace, name)
        existing = self._entries.get(key)
        if existing is None:
            group = config.group(node.namespace, node.auto_register_group)
            if group is None:
                raise RegistrationError(
                    "FAILED_PRECONDITION",
                    f"auto-registration WorkloadEntry of {node.id} failed: cannot find "
                    f"WorkloadGroup {node.namespace}/{node.auto_register_group}",
                )
            self._put(entry_from_group(name, node, group, self.controller, now))
        else:
            annotations = {k: v for k, v in existing.annotations.items() if k != DISCONNECTED_AT}
            annotations[CONTROLLER_ANNOTATION] = self.controller
            annotations[CONNECTED_AT] = rfc3339nano(now)
            self._put(dataclasses.replace(existing, annotations=annotations, delete_at=None))
        proxy_key = "~".join((node.network, node.ips[0], name, node.namespace))
        self._streams[stream] = _Stream(key, proxy_key, now, node)
        self._counts[proxy_key] = self._counts.get(proxy_key, 0) + 1
        return self._entries[key]

    def disconnect(self, stream: str, now: float) -> WorkloadEntry | None:
        """A stream closed; the entry is marked disconnected when it was the proxy's last."""
        held = self._streams.pop(stream, None)
        if held is None:
            return None
        remaining = self._counts.get(held.proxy_key, 0) - 1
        if remaining > 0:
            self._counts[held.proxy_key] = remaining
            return None
        self._counts.pop(held.proxy_key, None)
        entry = self._entries.get(held.key)
        if entry is None:
            return None
        annotations = {k: v for k, v in entry.annotations.items() if k != CONNECTED_AT}
        annotations[DISCONNECTED_AT] = rfc3339nano(now)
        updated = dataclasses.replace(entry, annotations=annotations, delete_at=now + self.grace)
        self._put(updated)
        return updated

    def report_health(self, stream: str, healthy: bool, message: str, now: float) -> bool:
        """HealthInformation from a stream; returns whether the entry changed. The report is
        kept with the stream even when its entry is gone (group deleted), so the entry comes
        back with it when the group does."""
        held = self._streams.get(stream)
        if held is None:
            return False
        held.health = (healthy, message, now)
        entry = self._entries.get(held.key)
        if entry is None:
            return False
        self._put(dataclasses.replace(entry, condition=_condition(entry.condition, held.health)))
        return True

    def reregister(self, config: MeshConfig, now: float) -> list[WorkloadEntry]:
        """Register again the connected proxies whose entry is gone but whose WorkloadGroup
        is in ``config`` (a group deleted, then created again while they stayed connected).
        ``connectedAt`` is the stream's own connect time; the last health report is applied."""
        back: list[WorkloadEntry] = []
        for stream_id in sorted(self._streams):
            held = self._streams[stream_id]
            if held.key in self._entries:
                continue  # present, or already restored through another stream of the proxy
            group = config.group(held.node.namespace, held.node.auto_register_group)
            if group is None:
                continue
            entry = entry_from_group(held.key[1], held.node, group, self.controller, now)
            annotations = {**entry.annotations, CONNECTED_AT: rfc3339nano(held.connected_at)}
            entry = dataclasses.replace(entry, annotations=annotations)
            if held.health is not None:
                entry = dataclasses.replace(entry, condition=_condition(None, held.health))
            self._put(entry)
            back.append(entry)
        return back

    def refresh(self, config: MeshConfig) -> list[WorkloadEntry]:
        """Apply the group template's ports to the entries of groups still in ``config``
        (a template port edited while VMs stay connected reaches their WorkloadEntry, hence
        the endpoints' ports and the proxy's own inbound cluster, without a reconnect).
        Returns the entries that changed."""
        changed: list[WorkloadEntry] = []
        for key in sorted(self._entries):
            entry = self._entries[key]
            group = config.group(entry.namespace, entry.group)
            if group is None or dict(group.ports) == dict(entry.ports):
                continue
            entry = dataclasses.replace(entry, ports=dict(group.ports))
            self._put(entry)
            changed.append(entry)
        return changed

    def next_deadline(self) -> float | None:
        deadlines = [e.delete_at for e in self._entries.values() if e.delete_at is not None]
        return min(deadlines) if deadlines else None

    def expire(self, now: float) -> list[WorkloadEntry]:
        """Delete entries whose grace period has passed without a reconnect."""
        gone = [e for e in self._entries.values() if e.delete_at is not None and e.delete_at <= now]
        for entry in gone:
            del self._entries[(entry.namespace, entry.name)]
            self.generation += 1
        return gone

    def prune(self, config: MeshConfig) -> list[WorkloadEntry]:
        """Delete entries whose WorkloadGroup no longer exists (owner-reference cascade)."""
        gone = [e for e in self._entries.values() if config.group(e.namespace, e.group) is None]
        for entry in gone:
            del self._entries[(entry.namespace, entry.name)]
            self.generation += 1
        return gone
