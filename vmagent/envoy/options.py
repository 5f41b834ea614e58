"""Everything the Envoy component needs from the configuration, in one immutable value.

ProxyConfig fields (mesh.yaml ``defaultConfig`` with ``PROXY_CONFIG`` over it) keep Istio's
names and defaults (``pkg/config/mesh/mesh.go``): ``binaryPath``, ``concurrency``,
``drainDuration`` (45s), ``terminationDrainDuration`` (5s), ``proxyAdminPort`` (15000).
Environment settings are fields of :class:`vmagent.config.Config` (``ENVOY_BINARY``,
``ISTIO_DELTA_XDS``, ``EXIT_ON_ZERO_ACTIVE_CONNECTIONS``, ``MINIMUM_DRAIN_DURATION``, ...).
Pure: config in, options out."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmagent.config import Config, parse_duration

XDS_SOCKET_NAME = "xds.sock"
SDS_SOCKET_NAME = "sds.sock"  # vmagent.identity.sds.SOCKET_NAME
BOOTSTRAP_NAME = "envoy-rev.json"  # Istio's name for the generated bootstrap


class EnvoyConfigError(ValueError):
    """A ProxyConfig or environment value the Envoy component cannot use (names the key)."""


@dataclass(frozen=True)
class EnvoyOptions:
    """Ports are TCP ports; durations are seconds."""

    xds_socket: str
    sds_socket: str
    bootstrap_path: str
    env_binary: str = ""  # ENVOY_BINARY
    binary_path: str = ""  # ProxyConfig.binaryPath
    version_check: bool = True  # VMAGENT_ENVOY_VERSION_CHECK
    delta_xds: bool = True  # ISTIO_DELTA_XDS
    admin_port: int = 15000  # ProxyConfig.proxyAdminPort
    status_host: str = "127.0.0.1"  # the agent's status endpoint (VMAGENT_STATUS_ADDR)
    status_port: int = 15020
    readiness_port: int = 15021
    prometheus_port: int = 15090
    # None: Istio's wildcard for the node's IP family ("0.0.0.0", or "::" if all IPs are v6).
    listen_address: str | None = None
    concurrency: int | None = None  # ProxyConfig.concurrency; None/0: Envoy's default
    drain_duration: float = 45.0  # ProxyConfig.drainDuration -> --drain-time-s
    termination_drain_duration: float = 5.0  # ProxyConfig.terminationDrainDuration
    exit_on_zero_active_connections: bool = False
    minimum_drain_duration: float = 5.0
    log_level: str = "warning"  # "level[,component:level...]" as Istio's --proxyLogLevel
    kill_timeout: float = 5.0  # SIGTERM -> SIGKILL


def envoy_options(config: Config) -> EnvoyOptions:
    """Options from the agent's config; EnvoyConfigError names a bad ProxyConfig key."""
    document = config.proxy_config.document
    host, _, port = config.vmagent_status_addr.rpartition(":")
    try:
        status_port = int(port)
    except ValueError:
        raise EnvoyConfigError(
            f"VMAGENT_STATUS_ADDR={config.vmagent_status_addr!r}: expected HOST:PORT"
        ) from None
    run_dir = config.vmagent_run_dir
    concurrency = _int(document, "concurrency", None)
    return EnvoyOptions(
        xds_socket=os.path.join(run_dir, XDS_SOCKET_NAME),
        sds_socket=os.path.join(run_dir, SDS_SOCKET_NAME),
        bootstrap_path=os.path.join(run_dir, BOOTSTRAP_NAME),
        env_binary=config.envoy_binary,
        binary_path=str(document.get("binaryPath") or ""),
        version_check=config.vmagent_envoy_version_check,
        delta_xds=config.istio_delta_xds,
        admin_port=_int(document, "proxyAdminPort", 15000) or 15000,
        readiness_port=config.vmagent_envoy_readiness_port,
        prometheus_port=config.vmagent_envoy_prometheus_port,
        status_host=host.strip("[]") or "127.0.0.1",
        status_port=status_port,
        concurrency=concurrency,
        drain_duration=_duration(document, "drainDuration", 45.0),
        termination_drain_duration=_duration(document, "terminationDrainDuration", 5.0),
        exit_on_zero_active_connections=config.exit_on_zero_active_connections,
        minimum_drain_duration=config.minimum_drain_duration,
        log_level=config.vmagent_envoy_log_level,
    )


def _int(document: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = document.get(key)
    if value is None:
        return default
    if isinstance(value, Mapping):  # protobuf JSON of an Int32Value wrapper
        value = value.get("value")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise EnvoyConfigError(
            f"ProxyConfig {key}: expected a whole number, got {value!r}"
        ) from None
    if number < 0:
        raise EnvoyConfigError(f"ProxyConfig {key}: must not be negative, got {number}")
    return number


def _duration(document: Mapping[str, Any], key: str, default: float) -> float:
    value = document.get(key)
    if value is None:
        return default
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise EnvoyConfigError(f"ProxyConfig {key}: {exc}, got {value!r}") from None
