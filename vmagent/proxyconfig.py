"""Istio's ProxyConfig as a VM gets it: ``mesh.yaml`` (``defaultConfig``, written by
``istioctl x workload entry configure``) with the ``PROXY_CONFIG`` environment variable (YAML)
laid over it, as pilot-agent does. Pure: text in, mapping out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

from vmagent.config_names import check_server_address
from vmagent.config_values import parse_duration

DEFAULT_DISCOVERY_ADDRESS = "istiod.istio-system.svc:15012"


class ProxyConfigError(ValueError):
    """A mesh.yaml or PROXY_CONFIG that cannot be used; names the source and the key."""


@dataclass(frozen=True)
class ProxyConfig:
    """The fields vmagent uses, plus the whole merged document (sent as node metadata)."""

    document: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def discovery_address(self) -> str:
        return str(self.document.get("discoveryAddress") or DEFAULT_DISCOVERY_ADDRESS)

    @property
    def proxy_metadata(self) -> Mapping[str, str]:
        return self.document.get("proxyMetadata") or {}

    @property
    def readiness_probe(self) -> Mapping[str, Any] | None:
        return self.document.get("readinessProbe")

    @property
    def service_cluster(self) -> str:
        return str(self.document.get("serviceCluster") or "")


def parse_mesh_config(text: str, origin: str) -> dict[str, Any]:
    """The ``defaultConfig`` of a MeshConfig YAML document (empty if absent)."""
    document = _load_yaml(text, origin)
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ProxyConfigError(f"{origin}: expected a YAML mapping with 'defaultConfig'")
    default = document.get("defaultConfig")
    if default is None:
        return {}
    if not isinstance(default, Mapping):
        raise ProxyConfigError(f"{origin}: defaultConfig: expected a mapping")
    return _checked(dict(default), f"{origin}: defaultConfig")


def parse_proxy_config_env(text: str, origin: str = "PROXY_CONFIG") -> dict[str, Any]:
    document = _load_yaml(text, origin)
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ProxyConfigError(f"{origin}: expected a YAML mapping of ProxyConfig fields")
    return _checked(dict(document), origin)


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> ProxyConfig:
    """PROXY_CONFIG over mesh.yaml: fields replace, proxyMetadata maps merge key by key."""
    merged = dict(base)
    for key, value in overlay.items():
        if key == "proxyMetadata" and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return ProxyConfig(MappingProxyType(merged))


def _load_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProxyConfigError(f"{origin}: not valid YAML: {exc}") from None


# ProxyConfig fields vmagent hands to Envoy (vmagent/envoy/options.py): checked here, at load,
# because Envoy given a bad one exits and would be restarted forever. Bounds: a port; a worker
# count (0: Envoy's default, one per core); drain times up to an hour.
_WHOLE_NUMBERS = {"proxyAdminPort": (0, 65535), "concurrency": (0, 4096)}
_DURATIONS = {"drainDuration": 3600.0, "terminationDrainDuration": 3600.0}


def _checked(config: dict[str, Any], where: str) -> dict[str, Any]:
    address = config.get("discoveryAddress")
    if address is not None:
        try:
            if not isinstance(address, str):
                raise ValueError("expected HOST:PORT")
            check_server_address(address, require_port=True)
        except ValueError as exc:
            raise ProxyConfigError(f"{where}: discoveryAddress: {exc} (got {address!r})") from None
    for key, (low, high) in _WHOLE_NUMBERS.items():
        value = config.get(key)
        if isinstance(value, Mapping):  # protobuf JSON of an Int32Value wrapper
            value = value.get("value")
        if value is None:
            continue
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ProxyConfigError(f"{where}: {key}: expected a whole number, got {value!r}")
        if not low <= int(str(value)) <= high:
            raise ProxyConfigError(f"{where}: {key}: must be between {low} and {high}, got {value}")
    for key, high_seconds in _DURATIONS.items():
        value = config.get(key)
        if value is None:
            continue
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            raise ProxyConfigError(f"{where}: {key}: {exc}, got {value!r}") from None
        if seconds > high_seconds:
            raise ProxyConfigError(f"{where}: {key}: must be at most 1h, got {value!r}")
    metadata = config.get("proxyMetadata")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise ProxyConfigError(f"{where}: proxyMetadata: expected a mapping of strings")
        clean: dict[str, str] = {}
        for key, value in metadata.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (int, float)):
                value = str(value)
            elif value is None:
                value = ""
            if not isinstance(value, str):
                raise ProxyConfigError(f"{where}: proxyMetadata.{key}: expected a string")
            clean[str(key)] = value
        config["proxyMetadata"] = clean
    probe = config.get("readinessProbe")
    if probe is not None and not isinstance(probe, Mapping):
        raise ProxyConfigError(f"{where}: readinessProbe: expected a mapping")
    return config
