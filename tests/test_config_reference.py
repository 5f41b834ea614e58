"""The configuration reference and the troubleshooting table are generated from the code and
committed (docs/configuration.md, docs/troubleshooting.md): they must match a fresh run, list
every setting, variable, command and flag, and state the ranges the loader really enforces."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmagent import proxyconfig
from vmagent.cli import build_parser
from vmagent.command_reference import commands, option_rows
from vmagent.config import Config, ConfigError, env_key, load_config, settings
from vmagent.config_layers import DYNAMIC_PREFIXES
from vmagent.config_reference import (
    CONFIGURATION_MD,
    PREFIX_HELP,
    PROXY_FIELDS,
    REGENERATE,
    SOURCE_NOTES,
    TROUBLESHOOTING_MD,
    documents,
    reference,
)
from vmagent.config_shapes import cells, describe
from vmagent.config_values import format_seconds
from vmagent.status.journal import LEVEL_VAR, LEVELS
from vmagent.troubleshooting_reference import SCENARIOS, problem_calls, rows

ROOT = Path(__file__).resolve().parents[1]
# Config fields that are not settings: what the loader records about the settings.
NOT_SETTINGS = {"sources", "dynamic", "proxy_config", "files", "flags"}


@pytest.fixture(scope="module")
def text() -> str:
    return reference()


def row(text: str, key: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
    return line


def test_the_committed_docs_are_what_the_code_generates() -> None:
    current = (ROOT / TROUBLESHOOTING_MD).read_text(encoding="utf-8")
    stale = []
    for path, expected in documents(current).items():
        committed = (ROOT / path).read_text(encoding="utf-8") if (ROOT / path).exists() else ""
        if committed != expected:
            diff = difflib.unified_diff(
                committed.splitlines(), expected.splitlines(), path, "generated", lineterm="", n=1
            )
            stale.append("\n".join(list(diff)[:60]))
    assert not stale, f"out of date: run {REGENERATE} and commit the result\n" + "\n".join(stale)


def test_every_config_field_is_a_described_setting_in_the_reference(text: str) -> None:
    for field in dataclasses.fields(Config):
        if field.name in NOT_SETTINGS:
            continue
        assert "parse" in field.metadata and field.metadata.get("help"), (
            f"Config.{field.name}: declare it with _setting(default, help, parse) so it is"
            " loaded, checked and documented"
        )
        line = row(text, env_key(field))
        default = str(field.metadata["raw"])
        assert (f"`{default}`" if default else "empty") in line, line
        assert str(field.metadata["help"]).split("(")[0].strip() in line, line


def test_an_undescribed_parser_is_named() -> None:
    def my_parser(raw: str) -> str:
        return raw

    with pytest.raises(LookupError, match=r"my_parser.*config_shapes\.py"):
        describe(my_parser)


def load(key: str, value: str, tmp_path: Path) -> Config:
    return load_config({key: value}, cluster_env=os.devnull, root=tmp_path)


def bounds(parser: object) -> tuple[str, str, str, str] | None:
    """(lowest, highest, just below, just above) as a user would write them, for the range
    parsers the reference states a range for."""
    if getattr(parser, "__qualname__", "") != "in_range.<locals>.checked":
        return None
    c = cells(parser)  # type: ignore[arg-type]
    unit = cells(c["show"]).get("unit", "")
    low, high = c["low"], c["high"]
    if unit == "s":
        step = 0.001 if low < 1 else 1
        return (format_seconds(low), format_seconds(high), str(round(low - step, 6)),
                str(round(high + step, 6)))  # fmt: skip
    return str(int(low)), str(int(high)), str(int(low) - 1), str(int(high) + 1)


SECRET_TTL_BOUNDS = ("10s", "8760h", "9s", "8761h")  # config_values._secret_ttl: no closure
RANGED = [f for f in settings() if bounds(f.metadata["parse"]) or env_key(f) == "SECRET_TTL"]


@pytest.mark.parametrize("field", RANGED, ids=env_key)
def test_stated_ranges_are_the_ones_enforced(
    field: dataclasses.Field[object], text: str, tmp_path: Path
) -> None:
    """Each range the reference states: both ends load, one step outside is refused."""
    key = env_key(field)
    low, high, below, above = bounds(field.metadata["parse"]) or SECRET_TTL_BOUNDS
    assert f"{low} to {high}" in row(text, key)
    for ok in (low, high):
        load(key, ok, tmp_path)
    for bad in (below, above):
        with pytest.raises(ConfigError, match=key):
            load(key, bad, tmp_path)


def test_choices_stated_are_the_ones_accepted(text: str, tmp_path: Path) -> None:
    line = row(text, "CREDENTIAL_FETCHER_TYPE")
    for choice in re.findall(r"`([A-Za-z]+)`", line.split("|")[3]):
        load("CREDENTIAL_FETCHER_TYPE", choice, tmp_path)
    with pytest.raises(ConfigError, match="CREDENTIAL_FETCHER_TYPE"):
        load("CREDENTIAL_FETCHER_TYPE", "Oracle", tmp_path)


def test_log_level_is_documented_and_checked(text: str) -> None:
    """VMAGENT_LOG_LEVEL is read outside Config (logging starts before the configuration
    loads): it is listed with the levels the code accepts, and a bad one is exit 2."""
    line = row(text, LEVEL_VAR)
    assert all(f"`{level}`" in line for level in LEVELS) and "`info`" in line.split("|")[2]
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), LEVEL_VAR: "loud"}
    env["VMAGENT_CLUSTER_ENV"] = os.devnull
    result = subprocess.run(
        [sys.executable, "-m", "vmagent", "config", "show"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2 and LEVEL_VAR in result.stderr, result


def test_variables_read_outside_config_are_listed(text: str) -> None:
    assert "`VMAGENT_CLUSTER_ENV`" in text
    assert set(PREFIX_HELP) == set(DYNAMIC_PREFIXES)
    assert all(f"| `{prefix}*` |" in text for prefix in DYNAMIC_PREFIXES)
    assert set(SOURCE_NOTES) <= {env_key(f) for f in settings()}
    checked = set(proxyconfig._WHOLE_NUMBERS) | set(proxyconfig._DURATIONS)
    assert checked <= set(PROXY_FIELDS), "describe the ProxyConfig fields proxyconfig checks"


def test_every_command_and_option_is_in_the_reference(text: str) -> None:
    parser = build_parser()
    listed = list(commands(parser))
    assert {("config", "reference"), ("run",), ("status",), ("dns", "serve")} <= {
        words for words, _, _ in listed
    }
    for words, child, _ in listed:
        heading = f"### `vmagent {' '.join(words)}`"
        assert heading in text
        section = text.split(heading, 1)[1].split("\n### ", 1)[0]
        for flag, _ in option_rows(child, frozenset({"--cluster-env", "--log-level"})):
            assert f"| `{flag}` |" in section, (words, flag)
    for flag in ("--cluster-env FILE", "--log-level {debug,info,warning,error}"):
        assert f"| `{flag}` |" in text
    # A flag that sets a setting says which.
    assert "| `--listen HOST:PORT` |" in text and "(sets `DNS_PROXY_ADDR`)" in text


def test_the_command_prints_the_reference_whatever_the_environment(tmp_path: Path) -> None:
    """`vmagent config reference > docs/configuration.md` regenerates the file: the output
    does not depend on the working directory or the settings in force."""
    expected = (ROOT / CONFIGURATION_MD).read_text(encoding="utf-8")
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "VMAGENT_CLUSTER_ENV": os.devnull}
    env.update(POD_NAMESPACE="elsewhere", DNS_PROXY_ADDR="127.0.0.9:5353", COLUMNS="40")
    result = subprocess.run(
        [sys.executable, "-m", "vmagent", "config", "reference"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_every_status_problem_is_in_the_troubleshooting_table() -> None:
    """One scenario per `_problem(...)` in vmagent/status/view.py: a new problem without a
    scenario (vmagent/troubleshooting_reference.py SCENARIOS) fails here."""
    found = rows()
    assert len(SCENARIOS) == problem_calls()
    assert len({(r["part"], r["action"]) for r in found}) == problem_calls()
    table = (ROOT / TROUBLESHOOTING_MD).read_text(encoding="utf-8")
    assert all(r["action"] in " ".join(table.split()) for r in found)


def test_readme_keeps_its_first_two_commands_and_links_the_docs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    assert blocks[0].strip() == "scripts/setup && .venv/bin/vmagent dev"
    assert blocks[1].strip() == "scripts/test"
    for doc in ("docs/configuration.md", "docs/troubleshooting.md", "docs/operations.md"):
        assert f"]({doc})" in readme, doc


@pytest.mark.parametrize("doc", ["README.md", "docs/operations.md", "docs/troubleshooting.md",
                                 "docs/configuration.md"])  # fmt: skip
def test_relative_links_point_at_files(doc: str) -> None:
    path = ROOT / doc
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        assert (path.parent / target).exists(), f"{doc}: broken link {target}"
