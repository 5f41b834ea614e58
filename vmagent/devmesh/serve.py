"""``vmagent devmesh serve``: the dev CA and the xDS control plane on one TLS port (like
istiod's 15012), plus the debug HTTP server. :func:`running_devmesh` is what the command, the
tests and ``vmagent dev`` use."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from vmagent.devmesh.controlplane import ControlPlane, ControlPlaneSettings
from vmagent.devmesh.server import DevCa
from vmagent.devmesh.settings import DevCaSettings
from vmagent.identity.certs import spiffe_ids


@dataclass(frozen=True)
class DevMesh:
    ca: DevCa
    control_plane: ControlPlane

    @property
    def address(self) -> str:
        """``host:port`` of the TLS gRPC endpoint (CA and ADS)."""
        return self.ca.address

    @property
    def root_cert(self) -> Path:
        return Path(self.ca.settings.directory) / "root-cert.pem"

    @property
    def debug_url(self) -> str:
        return self.control_plane.debug_url


@contextlib.asynccontextmanager
async def running_devmesh(
    ca_settings: DevCaSettings,
    settings: ControlPlaneSettings,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[DevMesh]:
    """Start CA + ADS + debug server; raises ConfigFileError for an unusable config dir."""
    control_plane = ControlPlane(settings, clock)
    ca = DevCa(ca_settings, clock, extra_services=(control_plane.add_to_server,))

    def identify(peer: str) -> str | None:
        front = ca.service.front
        der = front.peer_certificate(peer) if front else None
        ids = spiffe_ids(x509.load_der_x509_certificate(der)) if der else ()
        return ids[0] if ids else None

    control_plane.ads.identify = identify
    # Each start inside its try: a start cut short (Ctrl-C cancels it) stops what it began,
    # else a gRPC server is left to the garbage collector ("Event loop is closed").
    try:
        await ca.start()
        try:
            await control_plane.start()
            yield DevMesh(ca, control_plane)
        finally:
            await control_plane.stop()
    finally:
        await ca.stop()
