"""Workload identity: platform credential -> CSR to the mesh CA -> rotated certificate -> SDS."""

from vmagent.identity.certs import CertBundle
from vmagent.identity.detect import Detection, choose_provider
from vmagent.identity.manager import CertificateManager, IdentityError, create_manager
from vmagent.identity.sds import SdsServer, sds_socket_path
from vmagent.identity.tokens import Credential, CredentialError

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
