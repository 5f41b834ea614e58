"""The ``vmagent`` command line as a user types it: global options after the subcommand, a
command group alone prints its own help, and long-running commands stop on Ctrl-C quietly."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import free_port

from vmagent.cli import build_parser

NOISE = ("Traceback", "Event loop is closed", "was never awaited", "Exception ignored")
GROUPS = ("config", "dns", "identity", "devmesh")


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command: (its words, its parser)."""
    children = [
        (name, child)
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, child in action.choices.items()
    ]
    if not children:
        yield path, parser
    for name, child in children:
        yield from leaves(child, (*path, name))


def required_args(parser: argparse.ArgumentParser) -> list[str]:
    return [
        word
        for action in parser._actions
        if action.required and action.option_strings
        for word in (action.option_strings[0], "x")
    ]


COMMANDS = [path for path, _ in leaves(build_parser())]


def test_every_command_is_listed() -> None:
    assert {("config", "show"), ("run",), ("dns", "serve"), ("dev",)} <= set(COMMANDS)
    assert {("identity", "serve"), ("devmesh", "serve"), ("devmesh", "ca")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_global_options_work_after_every_subcommand(path: tuple[str, ...]) -> None:
    parser = build_parser()
    leaf = dict(leaves(parser))[path]
    after = parser.parse_args(
        [*path, *required_args(leaf), "--cluster-env", "F", "--log-level", "debug"]
    )
    assert (after.cluster_env, after.log_level) == ("F", "debug")
    # Given before the subcommand, they are not reset by the subcommand's own parser.
    before = parser.parse_args(
        ["--cluster-env", "G", "--log-level", "error", *path, *required_args(leaf)]
    )
    assert (before.cluster_env, before.log_level) == ("G", "error")
    neither = parser.parse_args([*path, *required_args(leaf)])
    assert (neither.cluster_env, neither.log_level) == (None, "info")


def vmagent(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmagent", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_config_show_reads_the_cluster_env_given_after_it(tmp_path: Path) -> None:
    cluster_env = tmp_path / "cluster.env"
    cluster_env.write_text("POD_NAMESPACE=after-the-subcommand\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin")}
    result = vmagent("config", "show", "--cluster-env", str(cluster_env), env=env)
    assert result.returncode == 0, result.stderr
    (line,) = [row for row in result.stdout.splitlines() if row.startswith("POD_NAMESPACE ")]
    assert "'after-the-subcommand'" in line and str(cluster_env) in line, line


@pytest.mark.parametrize("group", GROUPS)
def test_a_command_group_alone_prints_its_own_help(group: str) -> None:
    result = vmagent(group)
    assert result.returncode == 2, result
    assert result.stdout.startswith(f"usage: vmagent {group} "), result.stdout
    assert "SUBCOMMAND" in result.stdout and "Traceback" not in result.stderr


def test_vmagent_alone_prints_its_help() -> None:
    result = vmagent()
    assert result.returncode == 2
    assert result.stdout.startswith("usage: vmagent ") and "COMMAND" in result.stdout


def test_output_into_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    """``vmagent config show | head -1``: the reader leaving is no traceback."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "VMAGENT_CLUSTER_ENV": os.devnull}
    result = subprocess.run(
        f"{sys.executable} -m vmagent config show | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.stdout.count("\n") == 1 and not result.stderr, result


# --- Ctrl-C on long-running commands -----------------------------------------------------------


def agent_env(tmp_path: Path) -> dict[str, str]:
    """Enough for ``run`` and ``identity serve`` to start and keep retrying a CA that is not
    there (a closed loopback port); everything on free loopback ports, in ``tmp_path``."""
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "istio-token").write_text("opaque-token")
    (tmp_path / "cluster.env").write_text("")
    (tmp_path / "resolv.conf").write_text("# none\n")
    return {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "PYTHONUNBUFFERED": "1",
        "VMAGENT_CLUSTER_ENV": str(tmp_path / "cluster.env"),
        "VMAGENT_MESH_CONFIG": os.devnull,
        "VMAGENT_CONFIG_DIR": str(etc),
        "VMAGENT_STATE_DIR": str(tmp_path / "state"),
        "VMAGENT_RUN_DIR": str(tmp_path / "run"),
        "OUTPUT_CERTS": str(tmp_path / "certs"),
        "CREDENTIAL_FETCHER_TYPE": "JWT",
        "VMAGENT_TOKEN_FILE": str(etc / "istio-token"),
        "CA_ADDR": f"127.0.0.1:{free_port()}",
        "VMAGENT_STATUS_ADDR": f"127.0.0.1:{free_port()}",
        "DNS_PROXY_ADDR": f"127.0.0.1:{free_port()}",
        "VMAGENT_DNS_UPSTREAMS": f"127.0.0.1:{free_port()}",
        "VMAGENT_RESOLV_CONF": str(tmp_path / "resolv.conf"),
        "POD_NAMESPACE": "vm",
        "ISTIO_SVC_IP": "10.20.30.40",
        # Envoy's ports too: a taken one stops `vmagent run` (another test may hold 15000).
        "PROXY_CONFIG": f"proxyAdminPort: {free_port()}",
        "VMAGENT_ENVOY_READINESS_PORT": str(free_port()),
        "VMAGENT_ENVOY_PROMETHEUS_PORT": str(free_port()),
    }


def interrupt(argv: list[str], env: dict[str, str], after: float, log: Path) -> tuple[int, str]:
    """Start ``vmagent ARGV``, send SIGINT (Ctrl-C) ``after`` seconds later; returns the exit
    status and everything it printed."""
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "vmagent", *argv], env=env, stdout=sink, stderr=sink
        )
    try:
        time.sleep(after)
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return code, log.read_text(errors="replace")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("after", [0.5, 3.0])
@pytest.mark.parametrize(
    "argv",
    [["run"], ["identity", "serve"], ["dns", "serve", "--name-table", "TABLE"]],
    ids=" ".join,
)
def test_ctrl_c_stops_quietly(tmp_path: Path, argv: list[str], after: float) -> None:
    """Early (starting up) and once running: a normal exit, never a traceback."""
    table = Path(__file__).resolve().parents[1] / "examples" / "name-table.json"
    argv = [str(table) if word == "TABLE" else word for word in argv]
    code, output = interrupt(argv, agent_env(tmp_path), after, tmp_path / "out.log")
    # -SIGINT: the signal came before Python installed its handler (a loaded machine), so it
    # ended the process silently, as it ends any program that is still starting.
    assert code in (0, 130, -signal.SIGINT), output
    assert not [noise for noise in NOISE if noise in output], output


def test_ctrl_c_while_modules_load_is_no_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The heavy imports happen in main() (the command's modules, asyncio, grpc), where a
    KeyboardInterrupt becomes exit status 130."""
    import vmagent.cli

    def interrupted() -> argparse.ArgumentParser:
        raise KeyboardInterrupt

    monkeypatch.setattr(vmagent.cli, "build_parser", interrupted)
    assert vmagent.cli.main(["config", "show"]) == 130
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, vmagent.cli; print(sorted({'asyncio', 'grpc', "
         "'ssl', 'vmagent.config'} & set(sys.modules)))"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert heavy.stdout.strip() == "[]"  # importing the entry point loads none of them
