"""Log format under journald vs. on a terminal, and the log level's sources."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmagent.status.journal import (
    JournalErrorStream,
    JournalFormatter,
    log_level,
    syslog_priority,
    to_journal,
)


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("vmagent.dns", level, __file__, 1, message, None, None)


def test_priorities_and_every_line_prefixed() -> None:
    formatter = JournalFormatter()
    assert formatter.format(record(logging.INFO, "up")) == "<6>vmagent.dns: up"
    assert formatter.format(record(logging.ERROR, "a\nb")) == "<3>vmagent.dns: a\n<3>b"
    levels = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
    assert [syslog_priority(level) for level in levels] == [7, 6, 4, 3, 2]


def test_journal_only_when_journal_stream_is_this_stderr(tmp_path: Path) -> None:
    with (tmp_path / "err").open("w") as stream, (tmp_path / "other").open("w") as other:
        info = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert to_journal(env, stream)
        assert not to_journal(env, other)  # inherited, but stderr was redirected
        assert not to_journal({}, stream)
        assert not to_journal({"JOURNAL_STREAM": "garbage"}, stream)


def test_level_from_flag_then_environment() -> None:
    assert log_level("error", {"VMAGENT_LOG_LEVEL": "debug"}) == "error"
    assert log_level(None, {"VMAGENT_LOG_LEVEL": "DEBUG"}) == "debug"
    assert log_level(None, {}) == "info"
    with pytest.raises(ValueError, match=r"VMAGENT_LOG_LEVEL='loud'.*debug, info, warning, error"):
        log_level(None, {"VMAGENT_LOG_LEVEL": "loud"})


def test_bad_log_level_variable_is_a_clear_error() -> None:
    env = {**os.environ, "VMAGENT_LOG_LEVEL": "loud", "VMAGENT_CLUSTER_ENV": os.devnull}
    done = subprocess.run(
        [sys.executable, "-m", "vmagent", "config", "show"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "VMAGENT_LOG_LEVEL='loud' is not a log level" in done.stderr
    assert "Traceback" not in done.stderr


def test_error_lines_printed_under_journald_carry_error_priority(tmp_path: Path) -> None:
    """`vmagent: configuration error: ...` is printed, not logged: under journald it must be
    <3> (error), or `journalctl -p warning` hides why the unit keeps failing."""
    err = tmp_path / "stderr"
    with err.open("w") as stream:
        info = os.fstat(stream.fileno())
        env = {
            "PATH": os.environ["PATH"],
            "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}",
            "VMAGENT_CLUSTER_ENV": "/dev/null",
            "VMAGENT_MESH_CONFIG": "/dev/null",
            "CREDENTIAL_FETCHER_TYPE": "gce",
        }
        result = subprocess.run(
            [sys.executable, "-m", "vmagent", "config", "show"],
            stderr=stream, stdout=subprocess.DEVNULL, env=env, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 2
    lines = err.read_text().splitlines()
    assert lines and all(line.startswith("<3>") for line in lines), lines
    assert lines[0].startswith("<3>vmagent: configuration error: CREDENTIAL_FETCHER_TYPE")


def test_journal_error_stream_keeps_prefixed_lines_and_prefixes_the_rest() -> None:
    out = io.StringIO()
    stream = JournalErrorStream(out)  # type: ignore[arg-type]
    print("plain error", file=stream)
    stream.write("<6>logged line\nsecond ")
    stream.write("part\n")
    assert out.getvalue() == "<3>plain error\n<6>logged line\n<3>second part\n"
