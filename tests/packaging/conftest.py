"""Packages built once per test session, shared by the packaging, rpm and boot tests."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bootroot import NetNS, base_tarball, devmesh, resolver, skip_unless_bootable
from pkgtools import REPO, Built, build_packages, run, skip_unless_buildable


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    prebuilt = os.environ.get("VMAGENT_TEST_PACKAGES")
    if prebuilt:
        # A development shortcut (DEVELOPERS.md): packages build.sh made earlier, to iterate
        # on the boot tests without a minute's rebuild. CI never sets it.
        deb, rpm = (next(Path(prebuilt).glob(g)) for g in ("vmagent_*.deb", "vmagent-*.rpm"))
        root = tmp_path_factory.mktemp("root")
        run("dpkg-deb", "-x", deb, root)
        yield Built(deb, rpm, root, run("dpkg-deb", "-f", deb, "Version").stdout.strip())
        return
    skip_unless_buildable()
    opt_before = Path("/opt/vmagent").exists()
    build_dir_before = (REPO / "build").exists()
    deb, rpm = build_packages(tmp_path_factory.mktemp("packages"))
    assert Path("/opt/vmagent").exists() == opt_before, "build.sh touched the machine's /opt"
    assert (REPO / "build").exists() == build_dir_before, "build.sh left build/ in the checkout"
    root = tmp_path_factory.mktemp("root")
    run("dpkg-deb", "-x", deb, root)
    version = run("dpkg-deb", "-f", deb, "Version").stdout.strip()
    yield Built(deb, rpm, root, version)


@pytest.fixture(scope="session")
def rebuilt_packages(built: Built, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(deb, rpm): the same tree built again as release N+1 (a higher version), once per
    session for the deb boot tests and the rpm tests. ``VMAGENT_TEST_PACKAGES_NEXT`` names a
    directory with such a build (a development shortcut, beside ``VMAGENT_TEST_PACKAGES``)."""
    prebuilt = os.environ.get("VMAGENT_TEST_PACKAGES_NEXT")
    if prebuilt:
        deb, rpm = (next(Path(prebuilt).glob(g)) for g in ("vmagent_*.deb", "vmagent-*.rpm"))
        return deb, rpm
    release = str(int(built.version.rsplit("-", 1)[1]) + 1)
    return build_packages(tmp_path_factory.mktemp("packages-next"), release=release)


@pytest.fixture(scope="session")
def debian_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bootroot.base_tarball, made once per session for every module that unpacks a root."""
    if os.geteuid() != 0:
        pytest.skip("Debian roots need root (mmdebstrap, owners kept when unpacking)")
    if not os.environ.get("VMAGENT_TEST_ROOT_TARBALL") and shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap missing (apt-get install mmdebstrap); run scripts/setup --test")
    return base_tarball(tmp_path_factory.mktemp("boot-cache"))


@pytest.fixture(scope="session")
def tarball(debian_tarball: Path) -> Path:
    """The session's Debian root tarball, where this machine can boot a container."""
    skip_unless_bootable()
    return debian_tarball


@pytest.fixture
def netns() -> Iterator[NetNS]:
    """The VM's and the cloud's network namespaces (bootroot.NetNS), deleted after the test."""
    skip_unless_bootable()
    namespace = NetNS()
    try:
        yield namespace
    finally:
        namespace.delete()


@pytest.fixture
def keys(netns: NetNS, tmp_path: Path) -> Iterator[Path]:
    """The cloud side's resolver and devmesh; devmesh's key directory (root-cert.pem)."""
    with resolver(netns, tmp_path), devmesh(netns, tmp_path) as key_dir:
        yield key_dir
