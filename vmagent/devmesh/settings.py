"""The development CA's own configuration file (YAML), parsed into an immutable value.

Example (every key optional)::

    trustDomain: cluster.local          # default: TRUST_DOMAIN, else cluster.local
    dir: /var/lib/vmagent/devmesh       # dev root and token keys (generated when missing)
    listen: 127.0.0.1:15012
    gce: {jwks: google-jwks.json, issuer: "https://accounts.google.com"}
    aws: {certificates: [aws-region-cert.pem]}
    azure: {certificates: [azure-intermediate.pem], nonceMaxAge: 300}
    identities:
      - source: GoogleComputeEngine     # or AWS, Azure
        match: {project_id: my-project, instance_name: vm-1}
        namespace: shop
        serviceAccount: cart

Relative paths are relative to the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vmagent.identity.certs import spiffe_id_problem
from vmagent.identity.tokens import AWS, AZURE, GCE

GOOGLE_ISSUER = "https://accounts.google.com"
# istiod's default meshConfig.trustDomain; its trust domain is never empty
# (pkg/config/mesh/mesh.go DefaultMeshConfig), so neither is the dev CA's.
DEFAULT_TRUST_DOMAIN = "cluster.local"


class SettingsError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class IdentityRule:
    source: str
    match: Mapping[str, str]
    namespace: str
    service_account: str


@dataclasses.dataclass(frozen=True)
class DevCaSettings:
    trust_domain: str
    directory: str
    listen: str = "127.0.0.1:15012"
    gce_jwks: str = ""
    gce_issuer: str = GOOGLE_ISSUER
    aws_certificates: tuple[str, ...] = ()
    azure_certificates: tuple[str, ...] = ()
    azure_nonce_max_age: float = 300.0
    identities: tuple[IdentityRule, ...] = ()

    def __post_init__(self) -> None:
        """An empty trust domain (``TRUST_DOMAIN=''``, as istioctl writes cluster.env) means
        istiod's default; one that cannot make a SPIFFE ID is refused (SettingsError)."""
        domain = self.trust_domain.strip() or DEFAULT_TRUST_DOMAIN
        problem = spiffe_id_problem(f"spiffe://{domain}/ns/default/sa/default")
        if problem:
            raise SettingsError(
                f"trustDomain {self.trust_domain!r}: a SPIFFE trust domain is lowercase "
                "letters, digits, '.', '-' and '_'"
            )
        object.__setattr__(self, "trust_domain", domain)


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise SettingsError(f"{key}: expected a mapping")
    return value


def _paths(value: Any, key: str, base: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SettingsError(f"{key}: expected a list of file names")
    return tuple(str(base / v) for v in value)


def _rule(item: Any, position: int) -> IdentityRule:
    where = f"identities[{position}]"
    if not isinstance(item, Mapping):
        raise SettingsError(f"{where}: expected a mapping")
    source = {"googlecomputeengine": GCE, "gce": GCE, "aws": AWS, "azure": AZURE}.get(
        str(item.get("source", "")).lower()
    )
    if source is None:
        raise SettingsError(f"{where}.source: expected GoogleComputeEngine, AWS or Azure")
    match = item.get("match") or {}
    if not isinstance(match, Mapping) or not match:
        raise SettingsError(f"{where}.match: expected a non-empty mapping")
    namespace, account = item.get("namespace"), item.get("serviceAccount")
    if not (isinstance(namespace, str) and isinstance(account, str) and namespace and account):
        raise SettingsError(f"{where}: namespace and serviceAccount are required")
    return IdentityRule(source, {str(k): str(v) for k, v in match.items()}, namespace, account)


def parse_settings(
    data: Mapping[str, Any], base: Path, trust_domain: str, directory: str
) -> DevCaSettings:
    """Settings from parsed YAML; ``trust_domain`` and ``directory`` are the defaults."""
    gce, aws, azure = _section(data, "gce"), _section(data, "aws"), _section(data, "azure")
    identities = data.get("identities") or []
    if not isinstance(identities, list):
        raise SettingsError("identities: expected a list")
    jwks = gce.get("jwks", "")
    return DevCaSettings(
        trust_domain=str(data.get("trustDomain") or trust_domain),
        directory=str(base / data["dir"]) if data.get("dir") else directory,
        listen=str(data.get("listen", "127.0.0.1:15012")),
        gce_jwks=str(base / jwks) if jwks else "",
        gce_issuer=str(gce.get("issuer", GOOGLE_ISSUER)),
        aws_certificates=_paths(aws.get("certificates", []), "aws.certificates", base),
        azure_certificates=_paths(azure.get("certificates", []), "azure.certificates", base),
        azure_nonce_max_age=float(azure.get("nonceMaxAge", 300)),
        identities=tuple(_rule(item, n) for n, item in enumerate(identities)),
    )


def load_settings(path: str | None, trust_domain: str, directory: str) -> DevCaSettings:
    if not path:
        return DevCaSettings(trust_domain=trust_domain, directory=directory)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: {exc}") from None
    if not isinstance(data, Mapping):
        raise SettingsError(f"{path}: expected a YAML mapping")
    try:
        return parse_settings(data, Path(path).parent, trust_domain, directory)
    except (SettingsError, ValueError) as exc:
        raise SettingsError(f"{path}: {exc}") from None
