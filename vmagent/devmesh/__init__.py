"""Development mesh: a CA speaking Istio's IstioCertificateService (more parts in later issues)."""

from vmagent.devmesh.authority import Authority
from vmagent.devmesh.server import CaService, DevCa
from vmagent.devmesh.settings import DevCaSettings, IdentityRule, load_settings

__all__ = ["Authority", "CaService", "DevCa", "DevCaSettings", "IdentityRule", "load_settings"]
