"""Writing a file so that readers see the old or the new content, never a part (the
certificate store, the dev CA, ``vmagent onboard``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

_LABEL = "security.selinux"


def chown(path: Path | int, uid: int | None, gid: int | None) -> None:
    """``chown`` (a path or an open fd); None leaves that id as it is. Not root: a refusal is
    ignored (keeping one's own ownership is fine)."""
    if uid is None and gid is None:
        return
    try:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    except PermissionError:
        if os.geteuid() == 0:
            raise


def atomic_write(
    path: Path, data: bytes, mode: int, uid: int | None, gid: int | None, like: Path | None = None
) -> None:
    """Readers see the old or the new content, never a part: temporary file in the same
    directory, owner and mode set before any byte is written, fsync, rename, fsync dir.
    ``like``: a file whose SELinux label the new one takes (/etc/hosts is net_conf_t on
    EL9; a file created in /etc would get etc_t, which confined services cannot read).
    OSError as raised (the temporary file is removed)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            chown(out.fileno(), uid, gid)
            os.fchmod(out.fileno(), mode)
            if like is not None:
                with contextlib.suppress(OSError):  # no label, or no SELinux here
                    os.setxattr(out.fileno(), _LABEL, os.getxattr(like, _LABEL))
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
