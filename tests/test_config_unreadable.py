"""A configuration directory this user may not enter is a clear configuration error (exit 2),
not a traceback: ``Path.exists`` raises PermissionError there instead of answering."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run vmagent as another user")
def test_unreadable_config_dir_is_a_clear_error() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    top = Path(tempfile.mkdtemp(prefix="vmagent-perm-"))
    try:
        top.chmod(0o755)
        locked = top / "etc"
        locked.mkdir(mode=0o700)  # root's; the client below runs as nobody
        env = {"PATH": os.environ.get("PATH", ""), "VMAGENT_CONFIG_DIR": str(locked / "vmagent")}
        result = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-m", "vmagent", "config", "show"],
            env=env, cwd=top, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "permission denied" in result.stderr
        assert "VMAGENT_CONFIG_DIR" in result.stderr and str(locked) in result.stderr
    finally:
        shutil.rmtree(top, ignore_errors=True)
