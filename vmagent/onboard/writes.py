"""How ``vmagent onboard`` writes a file: atomically, owner and mode set before any byte."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from vmagent.fileio import atomic_write, chown

__all__ = ["atomic_write", "chown", "rewrite_keeping_owner"]


def rewrite_keeping_owner(path: Path, data: bytes) -> str | None:
    """Replace ``path`` with ``data``, keeping its owner, group and mode (new: 0644). Returns
    a note when the file had to be rewritten in place (a mount point), else None."""
    try:
        info = path.stat()
        mode, uid, gid = info.st_mode & 0o7777, info.st_uid, info.st_gid
    except FileNotFoundError:
        mode, uid, gid = 0o644, None, None
    try:
        atomic_write(path, data, mode, uid, gid, like=path)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        # A bind-mounted /etc/hosts (containers) cannot be renamed over: write it in place.
        with open(path, "r+b") as out:
            out.truncate(0)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        return f"{path} is a mount point: rewritten in place, not atomically"
    return None
