"""Workload identity: platform credential -> CSR to the mesh CA -> rotated certificate -> SDS."""

from typing import TYPE_CHECKING, Any

from vmagent.identity.certs import CertBundle
from vmagent.identity.detect import Detection, choose_provider
from vmagent.identity.manager import CertificateManager, IdentityError, create_manager
from vmagent.identity.tokens import Credential, CredentialError

if TYPE_CHECKING:
    from vmagent.identity.sds import SdsServer, sds_socket_path

__all__ = [
    "CertBundle",
    "CertificateManager",
    "Credential",
    "CredentialError",
    "Detection",
    "IdentityError",
    "SdsServer",
    "choose_provider",
    "create_manager",
    "sds_socket_path",
]


def __getattr__(name: str) -> Any:
    """SDS (grpc servicer and Envoy's secret protos) is imported on first use: an agent
    without Envoy never serves it."""
    if name in ("SdsServer", "sds_socket_path"):
        from vmagent.identity import sds

        return getattr(sds, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
