"""The certificate files in ``OUTPUT_CERTS``: atomic writes, careful reads.

``key.pem``, ``cert-chain.pem`` (leaf first, root last, as Istio writes it) and
``root-cert.pem``, mode 0600 in a 0700 directory. Each file is written to a temporary file,
fsynced, renamed over the old one, and the directory fsynced. Files that are missing, partial,
corrupt, mismatched or expired at start are reported with a warning and never served.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from vmagent import fileio
from vmagent.identity.certs import CertBundle, ChainError, bundle_from_files

log = logging.getLogger(__name__)

KEY_FILE = "key.pem"
CHAIN_FILE = "cert-chain.pem"
ROOT_FILE = "root-cert.pem"
STATUS_FILE = "identity-status.json"
FILE_MODE = 0o600
DIR_MODE = 0o700


class StoreError(OSError):
    """The certificate directory cannot be written; the message names it and the reason."""


def atomic_write(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a part."""
    fileio.atomic_write(path, data, mode, None, None)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class CertStore:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _prepare(self) -> None:
        self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if self.directory.stat().st_mode & 0o777 != DIR_MODE:
            os.chmod(self.directory, DIR_MODE)

    def save(self, bundle: CertBundle) -> None:
        """Write the files that changed; StoreError (old files untouched) if that fails."""
        files = (
            (ROOT_FILE, bundle.root_pem),
            (KEY_FILE, bundle.key_pem),
            (CHAIN_FILE, bundle.chain_pem),
        )
        try:
            self._prepare()
            for name, data in files:
                path = self.directory / name
                with contextlib.suppress(OSError):
                    if path.read_bytes() == data and path.stat().st_mode & 0o777 == FILE_MODE:
                        continue
                atomic_write(path, data)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StoreError(
                exc.errno, f"cannot write certificates to {self.directory}: {reason}"
            ) from None

    def load(self, now: float) -> CertBundle | None:
        """The stored bundle if complete and valid at ``now``, else None (with a warning)."""
        contents: dict[str, bytes] = {}
        for name in (KEY_FILE, CHAIN_FILE, ROOT_FILE):
            try:
                contents[name] = (self.directory / name).read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("ignoring stored certificate: cannot read %s: %s", name, exc)
                return None
        if not contents:
            return None
        if len(contents) < 3:
            missing = sorted({KEY_FILE, CHAIN_FILE, ROOT_FILE} - contents.keys())
            log.warning(
                "ignoring stored certificate in %s: %s missing", self.directory, ", ".join(missing)
            )
            return None
        try:
            created = (self.directory / CHAIN_FILE).stat().st_mtime
            return bundle_from_files(
                contents[KEY_FILE], contents[CHAIN_FILE], contents[ROOT_FILE], created, now
            )
        except (ChainError, OSError) as exc:
            log.warning("ignoring stored certificate in %s: %s", self.directory, exc)
            return None

    def discard(self, keep: str | Path | None = None) -> None:
        """Set the stored cert aside (``<file>.discarded``, kept for inspection) so that it is
        neither served nor shown; best effort. ``keep`` (the configured root file, which may
        live here, as Istio's ``/etc/certs/root-cert.pem`` does) is never moved."""
        for name in (KEY_FILE, CHAIN_FILE, ROOT_FILE):
            path = self.directory / name
            if keep is not None and _same_file(path, Path(keep)):
                continue
            try:
                os.replace(path, path.with_name(name + ".discarded"))
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot set %s aside: %s", path, exc)

    def save_status(self, status: dict[str, Any]) -> None:
        """Best effort: the status file is for ``vmagent identity show``."""
        try:
            self._prepare()
            atomic_write(
                self.directory / STATUS_FILE, json.dumps(status, indent=1, sort_keys=True).encode()
            )
        except OSError as exc:
            log.debug("cannot write %s: %s", STATUS_FILE, exc)

    def load_status(self) -> dict[str, Any]:
        try:
            value = json.loads((self.directory / STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}
