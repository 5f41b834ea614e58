"""Process plumbing for Envoy: dying with the agent, and its output into the agent's log.

:func:`spawn` makes the kernel send SIGKILL to Envoy when the agent dies, even by SIGKILL
(``prctl(PR_SET_PDEATHSIG)``, Linux). The kernel ties it to the *thread* that forked: spawn
Envoy from the event loop's thread (asyncio does) and run that loop in a thread that lives as
long as the agent (``asyncio.run`` in the main thread does).

It arms the signal with util-linux ``setpriv --pdeathsig KILL`` (which execs, so the pid is
Envoy's) rather than a ``preexec_fn``: Python code in a forked child of a threaded process
makes CPython run the fork handlers, and gRPC's then print "Other threads are currently
calling into gRPC, skipping fork() handlers" on stderr at every Envoy start (with any
``GRPC_VERBOSITY`` that shows INFO). ``preexec_fn`` (:func:`die_with_parent`) remains the
fallback where ``setpriv`` is missing."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LINE_LIMIT = 1 << 20  # bytes: longer Envoy log lines are logged in pieces
LOG_PREFIX = "envoy: "

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# "[warning][main] text" (the bootstrap's format) or Envoy's default before the bootstrap
# is read: "[2026-11-29 12:00:00.000][1][warning][main] [source/...] text".
_LEVEL = re.compile(r"\[(trace|debug|info|warning|error|critical)\]")


def line_level(line: str) -> int:
    """The Python log level for one Envoy log line (INFO when it names none)."""
    match = _LEVEL.search(line[:80])
    return _LEVELS[match.group(1)] if match else logging.INFO


def die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that arms PR_SET_PDEATHSIG=SIGKILL in the child, and exits the child
    at once if the parent is already gone (it died between fork and prctl). None off Linux.
    libc is resolved here, in the parent: the child only makes two system calls."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent_pid:
            os._exit(1)

    return arm


def pdeathsig_argv(argv: Sequence[str], parent_pid: int) -> list[str] | None:
    """``argv`` wrapped so that the kernel kills it when ``parent_pid`` dies: ``setpriv``
    arms PR_SET_PDEATHSIG=SIGKILL, then ``sh`` checks that the parent is still ``parent_pid``
    (it may have died before the prctl) and execs ``argv`` (same pid). None when off Linux or
    without ``setpriv``/``sh``."""
    setpriv, sh = shutil.which("setpriv"), shutil.which("sh")
    if not sys.platform.startswith("linux") or setpriv is None or sh is None:
        return None
    check = f'[ "$PPID" = {int(parent_pid)} ] || exit 1; exec "$@"'
    return [setpriv, "--pdeathsig", "KILL", "--", sh, "-c", check, "envoy", *argv]


async def spawn(argv: Sequence[str], **kwargs: Any) -> asyncio.subprocess.Process:
    """Start ``argv`` (stdin /dev/null, ``kwargs`` as for ``create_subprocess_exec``) so that it
    dies with this process (see the module docstring)."""
    parent = os.getpid()
    wrapped = pdeathsig_argv(argv, parent)
    if wrapped is not None:
        return await asyncio.create_subprocess_exec(
            *wrapped, stdin=asyncio.subprocess.DEVNULL, **kwargs
        )
    return await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent(parent), **kwargs
    )


async def pump_lines(stream: asyncio.StreamReader, log: logging.Logger) -> None:
    """Log every line of ``stream`` as ``envoy: LINE`` at the line's own level, until EOF."""
    while True:
        try:
            chunk = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            chunk = exc.partial  # EOF: the last line had no newline
            if not chunk:
                return
        except asyncio.LimitOverrunError as exc:
            chunk = await stream.read(max(exc.consumed, 1))
        text = chunk.decode("utf-8", "replace").rstrip("\r\n")
        if text:
            log.log(line_level(text), "%s%s", LOG_PREFIX, text)
