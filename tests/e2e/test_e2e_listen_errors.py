"""A port the agent cannot listen on stops ``vmagent run`` (exit 1) with a message naming the
setting that moves it, for every listener: DNS, status, Envoy's admin/readiness/Prometheus
(issue 7 §2); ``vmagent dns serve`` names its ``--listen`` flag."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import LOOPBACK, VM_IP, clean_env
from loopback import free_port

from vmagent.envoy.binary import resolve_binary

EXIT_WAIT = 30  # seconds


def _env(tmp_path: Path, **env: str) -> dict[str, str]:
    base = clean_env(
        VMAGENT_CONFIG_DIR=str(tmp_path / "etc"),
        VMAGENT_STATE_DIR=str(tmp_path / "state"),
        VMAGENT_RUN_DIR=str(tmp_path / "run"),
        VMAGENT_CLUSTER_ENV=os.devnull,
        VMAGENT_MESH_CONFIG=os.devnull,
        VMAGENT_STATUS_ADDR=f"{LOOPBACK}:{free_port()}",
        VMAGENT_RESOLV_CONF=os.devnull,
        VMAGENT_DNS_UPSTREAMS=f"{LOOPBACK}:{free_port()}",
        DNS_PROXY_ADDR=f"{LOOPBACK}:{free_port()}",
        ISTIO_SVC_IP=VM_IP,
        CA_ADDR=f"{LOOPBACK}:{free_port()}",
        VMAGENT_ENVOY="false",
    )
    base.update(env)
    return base


def _run(env: dict[str, str], *args: str) -> tuple[int, str]:
    command = args or ("run",)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vmagent", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=EXIT_WAIT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else str(exc.stderr)
        raise AssertionError(f"vmagent kept running:\n{stderr[-3000:]}") from None
    return done.returncode, done.stderr + done.stdout


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port that another "process" (this test) holds on 127.0.0.1, UDP and TCP."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        port = free_port()
        tcp.bind((LOOPBACK, port))
        tcp.listen(8)
        udp.bind((LOOPBACK, port))
        yield port


@pytest.mark.timeout(60)
def test_a_taken_dns_port_names_dns_proxy_addr(tmp_path: Path, busy_port: int) -> None:
    # Used to say only "cannot listen on 127.0.0.1 port N: Address already in use".
    code, output = _run(_env(tmp_path, DNS_PROXY_ADDR=f"{LOOPBACK}:{busy_port}"))
    assert code == 1, output
    assert f"cannot listen on 127.0.0.1 port {busy_port}: Address already in use" in output
    assert "move it with DNS_PROXY_ADDR=" in output, output
    assert "Traceback" not in output


@pytest.mark.timeout(60)
def test_dns_serve_names_its_listen_flag(tmp_path: Path, busy_port: int) -> None:
    table = tmp_path / "names.json"
    table.write_text("{}")
    env = _env(tmp_path)
    code, output = _run(
        env, "dns", "serve", "--name-table", str(table), "--listen", f"{LOOPBACK}:{busy_port}"
    )
    assert code == 1, output
    assert "move it with --listen HOST:PORT" in output, output


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("VMAGENT_ENVOY_READINESS_PORT", "Envoy readiness"),
        ("VMAGENT_ENVOY_PROMETHEUS_PORT", "Envoy Prometheus"),
        ("proxyAdminPort", "Envoy admin"),
    ],
)
def test_a_taken_envoy_port_is_fatal_and_named(
    tmp_path: Path, busy_port: int, key: str, what: str
) -> None:
    # Envoy used to log the bind failure, never become ready, and be restarted forever.
    env = _env(tmp_path, VMAGENT_ENVOY="true", ENVOY_BINARY=resolve_binary("", "", False).path)
    for other in ("VMAGENT_ENVOY_READINESS_PORT", "VMAGENT_ENVOY_PROMETHEUS_PORT"):
        env[other] = str(free_port())
    env["PROXY_CONFIG"] = f"proxyAdminPort: {free_port()}"
    if key == "proxyAdminPort":
        env["PROXY_CONFIG"] = f"proxyAdminPort: {busy_port}"
    else:
        env[key] = str(busy_port)
    code, output = _run(env)
    assert code == 1, output
    assert f"port {busy_port} ({what}): Address already in use" in output, output
    assert key in output, output
    assert "Traceback" not in output


@pytest.mark.timeout(60)
def test_sds_and_xds_sockets_that_cannot_be_made_name_the_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / ("d" * 60) / ("e" * 60)  # longer than a Unix socket path may be
    env = _env(tmp_path, VMAGENT_ENVOY="true", ENVOY_BINARY=resolve_binary("", "", False).path)
    env["VMAGENT_RUN_DIR"] = str(run_dir)
    env["PROXY_CONFIG"] = f"proxyAdminPort: {free_port()}"
    env["VMAGENT_ENVOY_READINESS_PORT"] = str(free_port())
    env["VMAGENT_ENVOY_PROMETHEUS_PORT"] = str(free_port())
    code, output = _run(env)
    assert code == 1, output
    assert f"cannot listen on the SDS/xDS sockets in {run_dir}" in output, output
    assert "set VMAGENT_RUN_DIR to a directory this agent can use" in output, output
    assert "Traceback" not in output
