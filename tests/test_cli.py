"""The ``vmagent`` command line as a user types it: global options after the subcommand, a
command group alone prints its own help, and long-running commands stop on Ctrl-C quietly."""

from __future__ import annotations

import argparse
import contextlib
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


def dev_argv(tmp_path: Path) -> list[str]:
    """``vmagent dev`` with every port moved to a free one (as tests/test_dev_command.py)."""
    ports = {flag: free_port() for flag in DEV_PORT_FLAGS}
    argv = ["dev", "--dir", str(tmp_path / "dev"), "--ip", "127.0.0.1"]
    argv += ["--outbound-bind", f"127.{os.getpid() % 250 + 1}.{int(time.time()) % 250 + 1}.9"]
    for flag, port in ports.items():
        argv += [flag, f"127.0.0.1:{port}" if flag.endswith("listen") else str(port)]
    return argv


DEV_PORT_FLAGS = (
    "--listen", "--debug-listen", "--dns-listen", "--status-listen", "--app-port",
    "--envoy-admin-port", "--inbound-port", "--outbound-port", "--readiness-port",
    "--prometheus-port",
)  # fmt: skip


@pytest.mark.timeout(120)
# The CA's gRPC server starts ~0.2-0.35 s in on an idle machine (first run: keys too), the
# banner ~0.35 s: a Ctrl-C inside ca.start() left its server to the garbage collector.
@pytest.mark.parametrize("after", [0.1, 0.2, 0.24, 0.26, 0.28, 0.3, 0.32, 0.36, 0.45, 0.6, 1.0])
def test_ctrl_c_stops_vmagent_dev_at_any_moment(tmp_path: Path, after: float) -> None:
    """One Ctrl-C while `vmagent dev` starts (CA, control plane, demo app, agent, Envoy)
    stops all of it: none lost (a second Ctrl-C needed), no traceback from a gRPC server left
    to the garbage collector, no Envoy left running."""
    psutil = pytest.importorskip("psutil")
    env = agent_env(tmp_path)
    env = {k: v for k, v in env.items() if k in ("PATH", "PYTHONUNBUFFERED")}
    env["VMAGENT_DNS_UPSTREAMS"] = f"127.0.0.1:{free_port()}"
    log = tmp_path / "out.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "vmagent", *dev_argv(tmp_path)],
            env=env, stdout=sink, stderr=sink,
        )  # fmt: skip
    children: set[int] = set()
    try:
        deadline = time.monotonic() + after
        while time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                children |= {c.pid for c in psutil.Process(process.pid).children(recursive=True)}
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        try:
            code = process.wait(8)
        except subprocess.TimeoutExpired:
            output = log.read_text(errors="replace")
            raise AssertionError(f"one Ctrl-C did not stop vmagent dev:\n{output}") from None
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    output = log.read_text(errors="replace")
    assert code in (0, 130, -signal.SIGINT), output
    assert not [noise for noise in NOISE if noise in output], output
    assert took < 8, (took, output)
    left = [pid for pid in children if psutil.pid_exists(pid)]
    left = [pid for pid in left if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, (left, output)


@pytest.mark.parametrize("key", ["XDS_ROOT_CA", "CA_ROOT_CA"])
def test_an_explicit_root_cert_that_does_not_exist_is_exit_2(tmp_path: Path, key: str) -> None:
    """A root certificate named explicitly but absent is a permanent mistake: `vmagent run`
    exits 2 naming the key and the path, rather than retrying the CA with backoff forever.
    (A missing default <VMAGENT_CONFIG_DIR>/root-cert.pem stays a logged, retried wait.)"""
    env = agent_env(tmp_path) | {key: "/nonexistent/root.pem"}
    result = subprocess.run(
        [sys.executable, "-m", "vmagent", "run"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert f"{key}='/nonexistent/root.pem'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_configuration_errors_have_one_prefix_and_name_envoy_binary(tmp_path: Path) -> None:
    """A bad environment value and a wrong ENVOY_BINARY read alike (``vmagent: configuration
    error: ...``, exit 2); the latter names ENVOY_BINARY and quotes only the first line of the
    program's ``--version`` output (no literal "\\n" from a usage text)."""
    fake = tmp_path / "not-envoy"
    fake.write_text("#!/bin/sh\nprintf 'usage: not-envoy [options]\\n  -x  do things\\n'\n")
    fake.chmod(0o755)
    prefixes = []
    for extra in ({"DNS_FORWARD_PARALLEL": "maybe"}, {"ENVOY_BINARY": str(fake)}):
        result = subprocess.run(
            [sys.executable, "-m", "vmagent", "run"],
            capture_output=True, text=True, timeout=30, env=agent_env(tmp_path) | extra,
        )  # fmt: skip
        assert result.returncode == 2, result
        (line,) = [row for row in result.stderr.splitlines() if "configuration error" in row]
        prefixes.append(line.partition("configuration error:")[0])
    assert prefixes == ["vmagent: ", "vmagent: "], prefixes
    assert f"ENVOY_BINARY={fake}" in line and "'usage: not-envoy [options]'" in line, line
    assert "\\n" not in line and "do things" not in line, line
