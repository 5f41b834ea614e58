"""``vmagent devmesh serve|ca --listen`` and ``--debug-listen``: a bad HOST:PORT is a usage
error naming the flag (exit 2) before anything is created or bound, not a traceback from
``int()`` or ``bind()``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "devmesh"


@pytest.mark.parametrize(
    ("argv", "flag", "says"),
    [
        (["serve", "--config", str(EXAMPLES), "--listen", "bogus"], "--listen", "no port"),
        (["serve", "--config", str(EXAMPLES), "--listen", "127.0.0.1:"], "--listen", "empty"),
        (["serve", "--config", str(EXAMPLES), "--listen", "127.0.0.1:99999"], "--listen", "65535"),
        (["serve", "--config", str(EXAMPLES), "--debug-listen", "x:y"], "--debug-listen", "port"),
        (["ca", "--listen", "127.0.0.1"], "--listen", "no port"),
    ],
)
def test_bad_listen_address_is_a_usage_error(
    tmp_path: Path, argv: list[str], flag: str, says: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmagent", "devmesh", *argv, "--dir", str(tmp_path / "keys")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, done
    assert f"argument {flag}" in done.stderr and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "keys").exists()  # refused before the CA wrote its keys
