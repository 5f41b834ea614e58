"""Fixtures for the black-box tests of ``vmagent dns serve``: real dnsmasq, real processes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnsfixtures import Dnsmasq, ServerFactory, start_upstream


def _require(tool: str) -> None:
    if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
        pytest.skip(f"{tool} is not installed (scripts/setup --test installs it)")


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    """The standard upstream dnsmasq (see ``dnsfixtures.upstream_args``), shared by all tests.

    Tests that count its queries use names nobody else asks for.
    """
    _require("dnsmasq")
    server = start_upstream(tmp_path_factory.mktemp("upstream"))
    yield server
    server.stop()


@pytest.fixture
def serve(tmp_path: Path, upstream: Dnsmasq) -> Iterator[ServerFactory]:
    """Factory for ``vmagent dns serve`` processes, all ended after the test."""
    factory = ServerFactory(tmp_path, upstream)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def serve_module(
    tmp_path_factory: pytest.TempPathFactory, upstream: Dnsmasq
) -> Iterator[ServerFactory]:
    """Like ``serve`` but shared by the tests of one module."""
    factory = ServerFactory(tmp_path_factory.mktemp("vmagent"), upstream)
    yield factory
    factory.close()


@pytest.fixture
def dig_tool() -> None:
    _require("dig")
