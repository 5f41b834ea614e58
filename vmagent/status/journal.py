"""Log format: journald's when stderr is the journal, today's on a terminal or file.

Under systemd, stderr connected to the journal is announced by ``$JOURNAL_STREAM`` =
``<device>:<inode>`` of that stream (systemd.exec(5): a program should compare it with
``fstat()`` of its stderr, since a child whose stderr was redirected inherits the variable).
There each line carries its syslog priority as a ``<N>`` prefix (sd-daemon(3): ``<3>`` error …
``<7>`` debug; journald strips it and records PRIORITY=N) and no timestamp of its own (the
journal stamps every entry). Elsewhere the format stays ``time LEVEL logger: message``."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Mapping
from typing import TextIO

TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error")
LEVEL_VAR = "VMAGENT_LOG_LEVEL"


def syslog_priority(levelno: int) -> int:
    """Python's level -> syslog priority (RFC 5424 §6.2.1 severities)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; every line of a multi-line message (a traceback) gets the
    prefix, as journald makes each line an entry of its own."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


_PREFIX = re.compile(r"<[0-7]>")


class JournalErrorStream(io.TextIOBase):
    """stderr under journald for what is not logged: the CLI's error lines (``vmagent:
    configuration error: ...``), usage errors, a traceback. journald would record them at its
    default priority, info, hiding them from ``journalctl -p warning``; each line without a
    ``<N>`` prefix gets ``<3>`` (error). Lines the log handler prefixed pass unchanged."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._at_line_start = True

    def write(self, text: str) -> int:
        out: list[str] = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start and not _PREFIX.match(piece):
                piece = "<3>" + piece
            out.append(piece)
            self._at_line_start = piece.endswith(("\n", "\r"))
        self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True


def to_journal(environ: Mapping[str, str], stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream ``$JOURNAL_STREAM`` names."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        info = os.fstat(stream.fileno())
        return (int(device), int(inode)) == (info.st_dev, info.st_ino)
    except (ValueError, OSError, AttributeError):
        return False


def log_level(flag: str | None, environ: Mapping[str, str]) -> str:
    """The level name: ``--log-level``, else ``$VMAGENT_LOG_LEVEL``, else ``info``. ValueError
    names the variable and the accepted values when it holds something else."""
    if flag:
        return flag
    value = environ.get(LEVEL_VAR, "").strip().lower()
    if not value:
        return "info"
    if value not in LEVELS:
        raise ValueError(
            f"{LEVEL_VAR}={environ[LEVEL_VAR]!r} is not a log level; use one of "
            + ", ".join(LEVELS)
        )
    return value


def configure_logging(level: str, environ: Mapping[str, str], stream: TextIO) -> None:
    """Install the root handler on ``stream`` at ``level`` (one of :data:`LEVELS`)."""
    handler = logging.StreamHandler(stream)
    journal = to_journal(environ, stream)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(TERMINAL_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
