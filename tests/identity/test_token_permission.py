"""A token the agent's user cannot read (copied by hand as root, 0600) says how to fix it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PROBE = """
import asyncio, sys
from vmagent.identity.providers import TokenFileProvider
from vmagent.identity import CredentialError
try:
    asyncio.run(TokenFileProvider(sys.argv[1]).fetch(0.0))
except CredentialError as exc:
    print(exc)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as nobody (setpriv)")
def test_unreadable_token_names_the_fix() -> None:
    # Not pytest's tmp_path: its parents are root-only.
    directory = Path(tempfile.mkdtemp(prefix="vmagent-token-"))
    try:
        directory.chmod(0o755)
        token = directory / "istio-token"
        token.write_text("opaque-token\n")
        token.chmod(0o600)
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", PROBE, str(token)],
            capture_output=True, text=True, timeout=60, check=False,
            cwd=str(Path(__file__).resolve().parents[2]),
        )  # fmt: skip
    finally:
        shutil.rmtree(directory)
    message = result.stdout.strip()
    assert "permission denied" in message, result
    assert f"chgrp vmagent {token} && chmod 0640 {token}" in message
