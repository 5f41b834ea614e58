"""Certificate files: atomic, private, and never trusted when damaged."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from vmagent.devmesh.authority import Authority
from vmagent.identity.certs import CertBundle, bundle_from_reply
from vmagent.identity.csr import build_csr, private_key_pem
from vmagent.identity.store import CertStore, StoreError

from .helpers import mode

SPIFFE = "spiffe://cluster.local/ns/shop/sa/cart"


def issue(ca: Authority, ttl: float = 3600) -> CertBundle:
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.sign_csr(build_csr(key, SPIFFE).decode(), SPIFFE, ttl, time.time())
    return bundle_from_reply(chain, key, private_key_pem(key), [ca.root_cert], time.time())


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority.load_or_create(tmp_path_factory.mktemp("ca"), "cluster.local", time.time())


def test_files_written_private_and_read_back(tmp_path: Path, ca: Authority) -> None:
    store = CertStore(tmp_path / "state" / "certs")
    bundle = issue(ca)
    store.save(bundle)
    assert mode(store.directory) == 0o700
    assert {p.name for p in store.directory.iterdir()} == {
        "key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    }  # no temporary files left behind
    assert all(mode(p) == 0o600 for p in store.directory.iterdir())
    loaded = store.load(time.time())
    assert loaded is not None
    assert (loaded.serial, loaded.key_pem, loaded.chain_pem) == (
        bundle.serial,
        bundle.key_pem,
        bundle.chain_pem,
    )


@pytest.mark.parametrize(
    "damage", ["truncated-chain", "garbage-key", "other-key", "missing-root", "expired"]
)
def test_damaged_files_are_discarded_with_a_warning(
    tmp_path: Path, ca: Authority, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = CertStore(tmp_path / "certs")
    store.save(issue(ca, ttl=2 if damage == "expired" else 3600))
    folder = store.directory
    if damage == "truncated-chain":
        data = (folder / "cert-chain.pem").read_bytes()
        (folder / "cert-chain.pem").write_bytes(data[: len(data) // 2])
    elif damage == "garbage-key":
        (folder / "key.pem").write_bytes(b"\x00\x01 not a key")
    elif damage == "other-key":
        (folder / "key.pem").write_bytes(issue(ca).key_pem)
    elif damage == "missing-root":
        (folder / "root-cert.pem").unlink()
    caplog.set_level(logging.WARNING)
    now = time.time() + (10 if damage == "expired" else 0)
    assert store.load(now) is None
    assert "ignoring stored certificate" in caplog.text


@contextlib.contextmanager
def unwritable_dir(tmp_path: Path, kind: str) -> Iterator[Path]:
    """A directory to make unwritable: a (tiny) tmpfs as root; a plain directory otherwise."""
    folder = tmp_path / kind
    folder.mkdir()
    if os.geteuid() != 0:
        if kind == "full":
            pytest.skip("a full filesystem needs root to mount a tiny tmpfs")
        try:
            yield folder  # the test makes it read-only with chmod
        finally:
            folder.chmod(0o700)
        return
    size = "16k" if kind == "full" else "1m"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_read_only_dir_is_a_clear_error_and_old_files_stay(tmp_path: Path, ca: Authority) -> None:
    with unwritable_dir(tmp_path, "ro") as folder:
        store = CertStore(folder)
        old = issue(ca)
        store.save(old)
        if os.geteuid() == 0:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:
            folder.chmod(0o500)
        with pytest.raises(StoreError, match=f"cannot write certificates to {folder}"):
            store.save(issue(ca))
        loaded = store.load(time.time())
        assert loaded is not None and loaded.serial == old.serial


def test_full_disk_keeps_the_old_files_whole(tmp_path: Path, ca: Authority) -> None:
    with unwritable_dir(tmp_path, "full") as folder:
        store = CertStore(folder)
        old = issue(ca)
        store.save(old)
        filler = folder / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as out:
            for _ in range(64):  # bounded: 64 x 1 KiB > 16 KiB
                out.write(b"x" * 1024)
                out.flush()
        with pytest.raises(StoreError, match="No space left on device"):
            store.save(issue(ca))
        loaded = store.load(time.time())
        assert loaded is not None and loaded.serial == old.serial


def test_discard_sets_files_aside_but_never_the_configured_root(tmp_path: Path) -> None:
    """Istio's VM layout keeps the onboarding root in the certificate directory
    (/etc/certs/root-cert.pem): discarding a certificate must not move it."""
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("key.pem", "cert-chain.pem", "root-cert.pem"):
        (certs / name).write_text(name)
    CertStore(certs).discard(keep=certs / "root-cert.pem")
    assert sorted(p.name for p in certs.iterdir()) == [
        "cert-chain.pem.discarded",
        "key.pem.discarded",
        "root-cert.pem",
    ]
    assert (certs / "cert-chain.pem.discarded").read_text() == "cert-chain.pem"
    CertStore(certs).discard(keep=tmp_path / "elsewhere.pem")
    assert (certs / "root-cert.pem.discarded").exists()
