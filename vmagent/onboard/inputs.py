"""Reading the files ``vmagent onboard`` checks, safely: only regular files are read; and
whether this user may write where onboard writes.

A FIFO would block ``open()`` forever, a directory or a device (``/dev/null``, ``/dev/zero``)
would be read as empty or endless content and then reported with a second, wrong error. So
every input is ``stat``-ed (following symlinks) before it is opened, opened with
``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot block either) and ``fstat``-ed again.
Each problem is one :class:`InputError` whose message names the path and what it is.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_MAX_BYTES = 16 << 20  # no onboarding file is near this (a hosts file is the largest)


class InputError(Exception):
    """A path that cannot be read as a file; the message starts with the path."""


def kind(mode: int) -> str:
    """``a directory``, ``a FIFO (named pipe)``, ... for ``st_mode``; ``a regular file``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def _via(path: Path) -> str:
    """`` (symlink to X)`` when ``path`` is a symlink, else ``""``."""
    if not path.is_symlink():
        return ""
    return f" (symlink to {os.readlink(path)})"


def dangling(path: Path) -> str | None:
    """``dangling symlink to X`` (X absolute) if ``path`` is a symlink whose target does not
    exist, else None."""
    if not path.is_symlink() or path.exists():
        return None
    target = os.readlink(path)
    shown = target if os.path.isabs(target) else f"{target} (= {path.parent / target})"
    return f"dangling symlink to {shown}"


def read_regular(path: Path, instead: str) -> bytes | None:
    """The content of ``path`` if it is (or a symlink leads to) a regular file; None if there
    is nothing at ``path``. InputError for a dangling symlink, anything that is not a regular
    file (``instead``: what to do then, appended to the message) or a read error."""
    try:
        info = path.stat()
    except FileNotFoundError:
        broken = dangling(path)
        if broken:
            raise InputError(f"{path}: {broken}; {instead}") from None
        return None
    except OSError as exc:  # ELOOP, EACCES, ENOTDIR...
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(
            f"{path}: not a regular file: {kind(info.st_mode)}{_via(path)}; {instead}"
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):  # replaced between stat and open
            raise InputError(f"{path}: not a regular file: {kind(mode)}; {instead}")
        try:
            data = file.read(_MAX_BYTES + 1)
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > _MAX_BYTES:
        raise InputError(f"{path}: larger than {_MAX_BYTES >> 20} MiB; {instead}")
    return data


def directory_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become, by ``mkdir -p``) a directory, or None: it is a file,
    a dangling symlink, or one of its ancestors is not a directory."""
    broken = dangling(path)
    if broken:
        return broken
    if path.exists():
        info = path.stat()
        return None if stat.S_ISDIR(info.st_mode) else (
            f"not a directory: {kind(info.st_mode)}{_via(path)}"
        )
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            return f"cannot be created: {probe} is a {dangling(probe)}"
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot be created: {probe} is {kind(probe.stat().st_mode)}, not a directory"
    return None


def need_writable(path: Path, instead: str, errors: list[str]) -> None:
    """An error unless this user may create files in ``path`` (or its nearest ancestor);
    ``instead``: the option that avoids writing there."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        errors.append(f"{probe}: not writable by {whoami()}: run with sudo, or pass {instead}")


def whoami() -> str:
    """This process's effective user name (``uid N`` without one)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"
