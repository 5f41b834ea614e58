"""Envoy under the agent: binary and version check, bootstrap, supervision and drain."""

from vmagent.envoy.binary import EnvoyBinary, EnvoyBinaryError, resolve_binary
from vmagent.envoy.bootstrap import build_bootstrap, command_line
from vmagent.envoy.options import EnvoyConfigError, EnvoyOptions, envoy_options
from vmagent.envoy.supervisor import EnvoySupervisor

__all__ = [
    "EnvoyBinary",
    "EnvoyBinaryError",
    "EnvoyConfigError",
    "EnvoyOptions",
    "EnvoySupervisor",
    "build_bootstrap",
    "command_line",
    "envoy_options",
    "resolve_binary",
]
