"""The ADS client's types and small decisions, apart from its stream loop (client.py): what a
connection presents, where pushes go, the relay an xDS proxy implements, the status kept, and
which stream and target the configuration asks for."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)

from vmagent.config import Config
from vmagent.dns.table import NameInfo
from vmagent.health import HealthEvent as Health
from vmagent.identity.channel import CaTarget, make_target, root_choices
from vmagent.xds.proxycore import DELTA, SOTW


@dataclass(frozen=True)
class ChannelAuth:
    """What a connection presents: the workload cert (key PEM, chain PEM) and a bearer token."""

    client_cert: tuple[bytes, bytes] | None = None
    token: str | None = None
    # Told the chain PEM of a client certificate the control plane refused in the handshake
    # (the identity manager then re-issues with the platform credential).
    refused: Callable[[bytes], None] | None = None


AuthSource = Callable[[], Awaitable[ChannelAuth]]
TableSink = Callable[[Mapping[str, NameInfo]], Awaitable[None]]
# Takes a pushed NameTable still serialized (``Any.value``) and swaps it in; NameTableError
# when it cannot be used (the push is NACKed with that message).
NdsSink = Callable[[bytes], Awaitable[None]]
Request: TypeAlias = DiscoveryRequest | DeltaDiscoveryRequest
Response: TypeAlias = DiscoveryResponse | DeltaDiscoveryResponse


class Relay(Protocol):
    """What the client tells an attached xDS proxy (all called on the event loop)."""

    def upstream_opened(self, kind: str) -> None: ...

    def upstream_closed(self) -> None: ...

    def upstream_response(self, response: Response) -> None: ...


def upstream_kind(config: Config) -> str:
    """The upstream stream's kind: delta when Envoy runs with delta ADS (``ISTIO_DELTA_XDS``,
    default true, the setting Envoy's bootstrap uses), so Envoy's stream and the agent's are
    one kind; state of the world when ``ISTIO_DELTA_XDS=false`` or ``VMAGENT_ENVOY=false``
    (the DNS-and-identity-only agent keeps the stream it always had)."""
    return DELTA if config.vmagent_envoy and config.istio_delta_xds else SOTW


def xds_target(config: Config) -> CaTarget:
    """Istio's rules for the discovery address: plaintext only on :15010, server name from
    ISTIOD_SAN (a localhost host means istiod's name), root XDS_ROOT_CA else the config dir's."""
    return make_target(
        config.proxy_config.discovery_address,
        config.istiod_san,
        root_choices(config, "XDS_ROOT_CA"),
        config.vmagent_config_dir,
        role="discovery",
        address_setting="the mesh config's discoveryAddress",
    )


class XdsConnectError(Exception):
    """The stream could not be opened; the message says why and what to do."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class XdsStatus:
    address: str = ""
    kind: str = SOTW
    connected: bool = False
    connected_once: bool = False
    connected_since: float | None = None
    streams: int = 0
    last_error: str | None = None
    table_version: str | None = None
    table_updates: int = 0
    nacks: int = 0
    last_nack: str | None = None
    health: Health | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "kind": self.kind,
            "connected": self.connected,
            "connected_once": self.connected_once,
            "connected_since": self.connected_since,
            "streams": self.streams,
            "last_error": self.last_error,
            "name_table_version": self.table_version,
            "name_table_updates": self.table_updates,
            "nacks": self.nacks,
            "last_nack": self.last_nack,
            "health": None
            if self.health is None
            else {"healthy": self.health.healthy, "message": self.health.message},
        }
