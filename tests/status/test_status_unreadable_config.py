"""`vmagent status` when the configuration cannot be read (a user outside the vmagent group):
it still asks the default socket and says so, instead of stopping at the configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

VMAGENT = str(Path(sys.executable).parent / "vmagent")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as nobody (setpriv)")
def test_unreadable_config_dir_still_asks_the_default_socket() -> None:
    # Not pytest's tmp_path: its parents are root-only, nobody could not even look.
    tmp_path = Path(tempfile.mkdtemp(prefix="vmagent-status-"))
    config_dir = tmp_path / "etc"
    config_dir.mkdir(mode=0o700)
    (config_dir / "cluster.env").write_text("POD_NAMESPACE=vm\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tmp_path.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "VMAGENT_CONFIG_DIR": str(config_dir),
        "VMAGENT_RUN_DIR": str(run_dir),
    }
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", VMAGENT, "status"],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip
    shutil.rmtree(tmp_path)
    # Not running (exit 3, not the configuration error's 2), naming the socket it asked and
    # why it did not read the configuration.
    assert result.returncode == 3, result.stderr
    assert f"{run_dir}/status.sock" in result.stderr
    assert "configuration not read" in result.stderr and str(config_dir) in result.stderr
