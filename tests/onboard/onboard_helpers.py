"""Onboarding inputs for the ``vmagent onboard`` tests: istioctl's real output
(tests/fixtures/istio-onboarding/, copied unchanged) plus the two files that come from a
cluster and are not in the fixtures: a root CA made here and a token shaped as istiod's
TokenRequest JWT (audience istio-ca, 1 h)."""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "istio-onboarding"
VMAGENT = Path(sys.executable).with_name("vmagent")  # .venv/bin/vmagent
FILES = ("cluster.env", "mesh.yaml", "root-cert.pem", "istio-token", "hosts")


def make_cert(ca: bool = True, days_before: float = 1, days_after: float = 365) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=days_before))
        .not_valid_after(now + datetime.timedelta(days=days_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def make_token(
    lifetime: float = 3600, audience: str = "istio-ca", now: float | None = None
) -> bytes:
    """A compact JWS as a Kubernetes TokenRequest returns it (signature not checked here),
    issued at ``now`` (default: the clock)."""

    def part(value: dict[str, object]) -> str:
        raw = json.dumps(value, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time() if now is None else now)
    claims = {
        "aud": [audience],
        "exp": now + int(lifetime),
        "iat": now - 10,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": "system:serviceaccount:bar:vm-serviceaccount",
    }
    return f"{part({'alg': 'RS256', 'kid': 'k'})}.{part(claims)}.c2lnbmF0dXJl\n".encode()


def onboarding_dir(path: Path, family: str = "ipv4") -> Path:
    """``path`` with the five files as istioctl writes them (ipv6 has no mesh.yaml of its
    own in the fixtures: the ipv4 one is used)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("cluster.env", "mesh.yaml", "hosts"):
        source = FIXTURES / family / name
        shutil.copyfile(source if source.exists() else FIXTURES / "ipv4" / name, path / name)
    (path / "root-cert.pem").write_bytes(make_cert())
    (path / "istio-token").write_bytes(make_token())
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without vmagent's and Istio's settings, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VMAGENT_", "ISTIO_", "XDS_", "PROXY_CONFIG"))
    }
    env.update(extra)
    return env


def onboard(*argv: str, env: dict[str, str] | None = None, as_nobody: bool = False,
            cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``vmagent onboard ARGV`` as a process; ``env`` default: :func:`clean_env` with
    ``VMAGENT_RUN_DIR`` pointing nowhere (the closing hint must not depend on an agent that
    runs, or once ran, on this machine)."""
    command = [str(VMAGENT), "onboard", *argv]
    if as_nobody:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
        env=env or clean_env(VMAGENT_RUN_DIR="/nonexistent/vmagent-run"),
    )


def snapshot(*roots: Path) -> dict[str, tuple[bytes, int, int, int]]:
    """Every file and directory under ``roots``: content, mode, uid, gid."""
    found: dict[str, tuple[bytes, int, int, int]] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            info = path.lstat()
            data = path.read_bytes() if path.is_file() else b""
            found[str(path)] = (data, info.st_mode, info.st_uid, info.st_gid)
    return found
