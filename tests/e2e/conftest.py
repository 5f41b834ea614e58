"""Fixtures of the end-to-end tests (``e2e_helpers`` has the machinery)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import World


def _require(tool: str) -> None:
    if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
        pytest.skip(f"{tool} is not installed (scripts/setup --test installs it)")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """devmesh, agents and dnsmasq for one test; every process is ended afterwards, and their
    output is printed (pytest shows it when the test failed)."""
    _require("dnsmasq")
    _require("dig")
    env = World(tmp_path)
    try:
        yield env
    finally:
        env.close()
        print(env.procs.logs())
