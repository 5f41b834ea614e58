"""``vmagent dev``'s flags, checked before anything starts: a bad HOST:PORT or port is a usage
error (exit 2) naming the flag with an example, never a traceback from bind(); a port used by
two of its listeners (devmesh, demo app, agent, Envoy) is one usage error naming both flags;
and the banner's ``vmagent status`` command is one the user can paste (after scripts/setup,
``vmagent`` is not on PATH: it is ``.venv/bin/vmagent``)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback import free_port
from test_dev_command import HOSTPORT_FLAGS, PORT_FLAGS, clean_env, loopback_address

from vmagent.devmesh.dev_ports import program

ROOT = Path(__file__).resolve().parents[1]
BAD_HOSTPORTS = ("127.0.0.1:99999", "garbage", "127.0.0.1:", ":15012", "127.0.0.1:x")
BAD_PORTS = ("99999", "0", "x", "")


def dev_argv(tmp_path: Path, ports: dict[str, int]) -> list[str]:
    """``vmagent dev`` with every port on ``ports`` (PORT_FLAGS' names)."""
    argv = [sys.executable, "-m", "vmagent", "dev", "--dir", str(tmp_path / "dev")]
    argv += ["--ip", "127.0.0.1", "--outbound-bind", loopback_address()]
    for name, flag in PORT_FLAGS.items():
        value = f"127.0.0.1:{ports[name]}" if name in HOSTPORT_FLAGS else str(ports[name])
        argv += [flag, value]
    return argv


def stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM (a clean stop), then SIGKILL if it does not end: no process outlives a test."""
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def run(argv: list[str], tmp_path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=clean_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("flag", list(PORT_FLAGS.values()))
def test_bad_port_flag_is_a_usage_error_naming_it(tmp_path: Path, flag: str) -> None:
    ports = {name: free_port() for name in PORT_FLAGS}
    hostport = flag in [PORT_FLAGS[name] for name in HOSTPORT_FLAGS]
    for bad in BAD_HOSTPORTS if hostport else BAD_PORTS:
        result = run([*dev_argv(tmp_path, ports), flag, bad], tmp_path)
        assert result.returncode == 2, (bad, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == "", (bad, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"vmagent dev: error: argument {flag}: "), (bad, last)
        assert "e.g. " in last, last


CLASHES = [
    ("status", "xds"),  # the user's report: --status-listen on the control plane's port
    ("dns", "debug"),
    ("app", "admin"),
    ("status", "readiness"),  # Envoy's readiness binds every address
    ("xds", "inbound"),
    ("debug", "prometheus"),
    ("app", "outbound"),
]


@pytest.mark.parametrize(("a", "b"), CLASHES)
def test_port_used_twice_is_refused_before_anything_starts(tmp_path: Path, a: str, b: str) -> None:
    ports = {name: free_port() for name in PORT_FLAGS}
    ports[a] = ports[b]
    started = time.monotonic()
    result = run(dev_argv(tmp_path, ports), tmp_path)
    assert result.returncode == 2, result.stderr
    assert "vmagent dev: a mesh" not in result.stdout  # no banner: nothing started
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(errors) == 1, result.stderr
    (line,) = errors
    assert line.startswith(f"vmagent dev: port {ports[a]} is used twice: "), line
    assert PORT_FLAGS[a] in line and PORT_FLAGS[b] in line, line
    assert time.monotonic() - started < 20


def test_program_is_what_the_user_can_paste(tmp_path: Path) -> None:
    script = tmp_path / "venv" / "bin" / "vmagent"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    python = str(script.parent / "python")
    # On PATH and the same file: its name.
    assert program(str(script), python, str(script), "/") == "vmagent"
    # Not on PATH (scripts/setup): the path, relative to the working directory when shorter.
    assert program("venv/bin/vmagent", python, None, str(tmp_path)) == "venv/bin/vmagent"
    assert program(str(script), python, None, str(tmp_path)) == "venv/bin/vmagent"
    assert program(str(script), python, None, "/srv/else/where") == str(script)
    # Another vmagent on PATH: still this one's path.
    assert program(str(script), python, "/usr/bin/vmagent", str(tmp_path)) == "venv/bin/vmagent"
    # python -m vmagent: the script beside the interpreter, else `PYTHON -m vmagent`.
    main = str(ROOT / "vmagent" / "__main__.py")
    assert program(main, python, None, str(tmp_path)) == "venv/bin/vmagent"
    python3 = "/opt/py/bin/python3"
    assert program(main, python3, None, "/srv/else") == f"{python3} -m vmagent"


@pytest.mark.timeout(60)
def test_banner_status_command_works_when_pasted(tmp_path: Path) -> None:
    # As after scripts/setup: .venv/bin/vmagent, run from the checkout, not on PATH.
    script = Path(sys.executable).parent / "vmagent"
    if not script.is_file():
        pytest.skip("no vmagent script beside this interpreter")
    ports = {name: free_port() for name in PORT_FLAGS}
    argv = [str(script), *dev_argv(tmp_path, ports)[3:]]
    env = clean_env(tmp_path) | {"VMAGENT_ENVOY": "false"}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != script.parent
    )
    log = tmp_path / "dev.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True
        )
    try:
        deadline = time.monotonic() + 30
        while " status --addr " not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        (line,) = [ln for ln in log.read_text().splitlines() if " status --addr " in ln]
        words = shlex.split(line)
        relative = os.path.relpath(script, ROOT)
        assert words[0] == min(relative, str(script), key=len), line  # .venv/bin/vmagent
        # Pasted as printed, in the same directory and shell: it runs (exit 0 healthy, 1
        # starting), not "command not found" (127).
        pasted = subprocess.run(
            line.strip(), shell=True, cwd=ROOT, env=env, capture_output=True, timeout=30
        )
        assert pasted.returncode in (0, 1), pasted
    finally:
        stop(process)


@pytest.mark.timeout(60)
def test_port_zero_for_devmesh_still_starts(tmp_path: Path) -> None:
    # --listen/--debug-listen HOST:0 (the kernel picks, as for devmesh serve) pass the checks.
    ports = {name: free_port() for name in PORT_FLAGS}
    argv = [*dev_argv(tmp_path, ports), "--listen", "127.0.0.1:0", "--debug-listen", "127.0.0.1:0"]
    env = clean_env(tmp_path) | {"VMAGENT_ENVOY": "false"}
    log = tmp_path / "dev.log"
    with log.open("w") as sink:
        process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while "control plane (CA + xDS" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        (line,) = [ln for ln in log.read_text().splitlines() if "control plane (CA + xDS" in ln]
        assert "127.0.0.1:0," not in line and "127.0.0.1:" in line, line
    finally:
        stop(process)
