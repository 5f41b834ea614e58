"""The status suite's live tests run a real agent against devmesh with the end-to-end helpers
(``tests/e2e/e2e_helpers.py``, ``two_vms.py``): that folder is made importable here, and the
``world`` fixture is the one the e2e suite uses."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

import shutil
from collections.abc import Iterator

import pytest
from e2e_helpers import World


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """devmesh, agents and dnsmasq for one test; every process is ended afterwards."""
    for tool in ("dnsmasq", "dig"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed (scripts/setup --test installs it)")
    env = World(tmp_path)
    try:
        yield env
    finally:
        env.close()
        print(env.procs.logs())
