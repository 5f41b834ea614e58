"""Where the onboarding files are: vmagent's configuration directory, else Istio's VM paths.

``istioctl x workload entry configure`` writes ``cluster.env``, ``mesh.yaml``,
``root-cert.pem`` and ``istio-token``; vmagent looks for all four in ``VMAGENT_CONFIG_DIR`` (so
moving that one directory moves everything), and when a file is not there, at the place Istio's
VM documentation puts it (reference §7.1, "Documented placement"). An explicit setting
(``--cluster-env``, ``VMAGENT_CLUSTER_ENV``, ``VMAGENT_MESH_CONFIG``, ``XDS_ROOT_CA``,
``VMAGENT_TOKEN_FILE``) wins over both.

Istio's paths are taken relative to ``root`` (``/`` in production) so tests can lay out a
whole filesystem in a temporary directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vmagent.config_values import ConfigError

# role -> (file name in VMAGENT_CONFIG_DIR, Istio's VM path relative to the filesystem root)
CLUSTER_ENV = "cluster.env"
MESH_CONFIG = "mesh config"
ROOT_CERT = "root cert"
TOKEN = "token"
ONBOARDING_FILES: dict[str, tuple[str, str]] = {
    CLUSTER_ENV: ("cluster.env", "var/lib/istio/envoy/cluster.env"),
    MESH_CONFIG: ("mesh.yaml", "etc/istio/config/mesh"),
    ROOT_CERT: ("root-cert.pem", "etc/certs/root-cert.pem"),
    TOKEN: ("istio-token", "var/run/secrets/tokens/istio-token"),
}

EXPLICIT = "explicit"
CONFIG_DIR = "VMAGENT_CONFIG_DIR"
ISTIO = "Istio's VM path"


@dataclasses.dataclass(frozen=True)
class FoundFile:
    """One onboarding file: ``role`` (see ONBOARDING_FILES), the path used, how it was chosen
    (``explicit: KEY``, ``VMAGENT_CONFIG_DIR`` or ``Istio's VM path``) and whether it exists."""

    role: str
    path: str
    how: str
    exists: bool

    def describe(self) -> str:
        missing = "" if self.exists else ", not present"
        return f"{self.role}: {self.path} ({self.how}{missing})"


def locate(
    role: str, config_dir: str, explicit: tuple[str, str] | None = None, root: str | Path = "/"
) -> FoundFile:
    """The file for ``role``: ``explicit`` = (path, the key or flag that named it) wins; then
    ``<config_dir>/<name>`` if it exists; then Istio's path under ``root`` if it exists; else
    the configuration directory's path (absent: the caller reports it when it needs it)."""
    if explicit is not None:
        path, key = explicit
        return FoundFile(role, path, f"{EXPLICIT}: {key}", _exists(Path(path), key))
    name, istio = ONBOARDING_FILES[role]
    ours = Path(config_dir) / name
    if _exists(ours, CONFIG_DIR):
        return FoundFile(role, str(ours), CONFIG_DIR, True)
    theirs = Path(root) / istio
    if _exists(theirs, ISTIO):
        return FoundFile(role, str(theirs), ISTIO, True)
    return FoundFile(role, str(ours), CONFIG_DIR, False)


class UnreadablePath(ConfigError):
    """An onboarding file's directory cannot be searched by this user."""


def _exists(path: Path, how: str) -> bool:
    """Whether ``path`` exists; a directory this user may not enter is an error that says so
    (``Path.exists`` raises PermissionError there instead of answering)."""
    try:
        return path.exists()
    except PermissionError:
        raise UnreadablePath(
            f"cannot look for {path} ({how}): permission denied; run as root or as a member of "
            "the group that owns the directory (vmagent)"
        ) from None
