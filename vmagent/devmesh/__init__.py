"""Development mesh: a CA speaking Istio's IstioCertificateService and an xDS control plane
(NDS, WorkloadEntry auto-registration, health) speaking to the agent as istiod does."""

from vmagent.devmesh.authority import Authority
from vmagent.devmesh.controlplane import ControlPlane, ControlPlaneSettings
from vmagent.devmesh.serve import DevMesh, running_devmesh
from vmagent.devmesh.server import CaService, DevCa
from vmagent.devmesh.services import ConfigFileError, MeshConfig, load_directory
from vmagent.devmesh.settings import DevCaSettings, IdentityRule, load_settings

__all__ = [
    "Authority",
    "CaService",
    "ConfigFileError",
    "ControlPlane",
    "ControlPlaneSettings",
    "DevCa",
    "DevCaSettings",
    "DevMesh",
    "IdentityRule",
    "MeshConfig",
    "load_directory",
    "load_settings",
    "running_devmesh",
]
