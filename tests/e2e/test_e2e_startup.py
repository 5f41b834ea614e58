"""``vmagent run`` starting up, as an operator sees it: a permanent misconfiguration exits 2 at
once naming the key and its source (never retried forever), a taken status endpoint exits 1
naming VMAGENT_STATUS_ADDR, and an agent configured by its configuration directory alone finds
every onboarding file, takes the CA address from mesh.yaml's discoveryAddress, keeps its
certificates in VMAGENT_STATE_DIR and says all of that in its log."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from e2e_helpers import (
    FAST,
    GROUP,
    LOOPBACK,
    NAMESPACE,
    SERVICE_ACCOUNT,
    VM_IP,
    TcpPort,
    World,
    clean_env,
    http_get,
    wait_for,
)
from loopback import free_port

EXIT_WAIT = 30  # seconds; the old agent retried these errors forever (the test then fails)


def _base_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """Every path under ``tmp_path``, free loopback ports, nothing reachable."""
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


def _run(env: dict[str, str]) -> tuple[int, str]:
    """``vmagent run`` until it exits by itself; (exit code, stderr)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vmagent", "run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=EXIT_WAIT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else str(exc.stderr)
        raise AssertionError(f"vmagent run kept running (retrying?):\n{stderr[-3000:]}") from None
    return done.returncode, done.stderr


# --- permanent configuration errors ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_grace_ratio_of_seven_exits_2_naming_key_source_and_range(tmp_path: Path) -> None:
    code, stderr = _run(_base_env(tmp_path, SECRET_GRACE_PERIOD_RATIO="7"))
    assert code == 2, stderr
    assert "SECRET_GRACE_PERIOD_RATIO='7' (from env): must be between 0 and 1" in stderr
    assert "Traceback" not in stderr

    cluster_env = tmp_path / "cluster.env"
    cluster_env.write_text("SECRET_GRACE_PERIOD_RATIO='7'\n")
    code, stderr = _run(_base_env(tmp_path, VMAGENT_CLUSTER_ENV=str(cluster_env)))
    assert code == 2, stderr
    assert f"SECRET_GRACE_PERIOD_RATIO='7' (from file:{cluster_env})" in stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("CREDENTIAL_FETCHER_TYPE", "bogus", "expected one of auto, JWT"),
        ("ECC_SIGNATURE_ALGORITHM", "DSA", "expected one of ECDSA, RSA"),
        ("WORKLOAD_RSA_KEY_SIZE", "1024", "between 2048 and 8192"),
        ("VMAGENT_DNS_UPSTREAMS", "10.0.0.1:0", "between 1 and 65535"),
    ],
)
def test_misconfiguration_that_used_to_be_retried_forever_exits_2(
    tmp_path: Path, key: str, value: str, allowed: str
) -> None:
    code, stderr = _run(_base_env(tmp_path, **{key: value}))
    assert code == 2, stderr
    assert f"{key}={value!r} (from env)" in stderr and allowed in stderr, stderr
    assert "restarting in" not in stderr and "Traceback" not in stderr, stderr


# --- the status endpoint must be ours ---------------------------------------------------------


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that another "process" (this test) listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


@pytest.mark.timeout(60)
def test_a_taken_status_port_is_fatal(tmp_path: Path, occupied_port: int) -> None:
    address = f"{LOOPBACK}:{occupied_port}"
    code, stderr = _run(_base_env(tmp_path, VMAGENT_STATUS_ADDR=address))
    assert code == 1, stderr
    assert f"cannot listen on VMAGENT_STATUS_ADDR={address}" in stderr, stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.timeout(60)
def test_a_status_socket_served_by_another_process_is_fatal(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(run_dir / "status.sock"))
        other.listen(8)
        code, stderr = _run(_base_env(tmp_path))
    assert code == 1, stderr
    assert f"another process is serving on {run_dir / 'status.sock'}" in stderr, stderr


# --- one directory configures everything ----------------------------------------------------


def _config_dir_only(world: World, port: TcpPort) -> tuple[dict[str, str], Path, Path, str]:
    """An agent whose onboarding comes only from files in VMAGENT_CONFIG_DIR (istioctl's
    names): no CA_ADDR, OUTPUT_CERTS, VMAGENT_TOKEN_FILE, PROXY_CONFIG or explicit file
    paths. Returns (environment, config dir, state dir, the control plane's address)."""
    probe = {"tcpSocket": {"port": port.port}, **FAST}
    mesh = world.devmesh(probe)
    agent = world.agent(mesh)  # root-cert.pem and istio-token in agent.etc
    etc = agent.etc
    (etc / "cluster.env").write_text(
        f"POD_NAMESPACE='{NAMESPACE}'\nSERVICE_ACCOUNT='{SERVICE_ACCOUNT}'\n"
        f"TRUST_DOMAIN='cluster.local'\nISTIO_SVC_IP='{VM_IP}'\n"
        f"ISTIO_META_AUTO_REGISTER_GROUP='{GROUP}'\nISTIO_META_CLUSTER_ID='Kubernetes'\n"
        f"ISTIO_META_WORKLOAD_NAME='{GROUP}'\nCREDENTIAL_FETCHER_TYPE='JWT'\n"
    )
    mesh_yaml = {"defaultConfig": {"discoveryAddress": mesh.address, "readinessProbe": probe}}
    (etc / "mesh.yaml").write_text(yaml.safe_dump(mesh_yaml))
    env = agent.env()
    for key in (
        "CA_ADDR",
        "OUTPUT_CERTS",
        "VMAGENT_TOKEN_FILE",
        "PROXY_CONFIG",
        "VMAGENT_CLUSTER_ENV",
        "VMAGENT_MESH_CONFIG",
        "POD_NAMESPACE",
        "SERVICE_ACCOUNT",
        "TRUST_DOMAIN",
        "ISTIO_SVC_IP",
        "CREDENTIAL_FETCHER_TYPE",
        "ISTIO_META_AUTO_REGISTER_GROUP",
        "ISTIO_META_CLUSTER_ID",
        "ISTIO_META_WORKLOAD_NAME",
        "ISTIO_META_DNS_CAPTURE",
        "ISTIO_METAJSON_LABELS",
    ):
        env.pop(key, None)
    env["VMAGENT_ENVOY"] = "false"
    return env, etc, agent.state_dir, mesh.address


@pytest.mark.timeout(90)
def test_the_config_directory_alone_onboards_the_vm(world: World) -> None:
    port = TcpPort()
    port.open()
    try:
        env, etc, state, address = _config_dir_only(world, port)
        shown = subprocess.run(
            [sys.executable, "-m", "vmagent", "config", "show"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        ca_row = next(r for r in shown.splitlines() if r.startswith("CA_ADDR "))
        assert f"mesh:{etc / 'mesh.yaml'} discoveryAddress" in ca_row, ca_row
        certs_row = next(r for r in shown.splitlines() if r.startswith("OUTPUT_CERTS "))
        assert repr(str(state / "certs")) in certs_row, certs_row

        proc = world.procs.start("agent", [sys.executable, "-m", "vmagent", "run"], env)
        status_url = "http://" + env["VMAGENT_STATUS_ADDR"]

        def ready() -> bool:
            assert proc.alive(), proc.describe()
            return http_get(status_url + "/healthz/ready")[0] == 200

        wait_for(ready, 30, "the agent to be ready", interval=0.1)
        # The certificate came from the CA named by mesh.yaml and lives in VMAGENT_STATE_DIR.
        assert (state / "certs" / "cert-chain.pem").is_file()
        assert (state / "certs" / "key.pem").is_file()

        def logged(*needles: str) -> bool:
            return all(needle in proc.stderr() for needle in needles)

        wait_for(lambda: logged("health: healthy", "readiness: ready"), 10, "log lines")
        log = proc.stderr()
        for role, name in (
            ("cluster.env", "cluster.env"),
            ("mesh config", "mesh.yaml"),
            ("root cert", "root-cert.pem"),
            ("token", "istio-token"),
        ):
            assert f"config: {role}: {etc / name} (VMAGENT_CONFIG_DIR)" in log, log
        mesh_source = f"mesh:{etc / 'mesh.yaml'}"
        assert f"CA: {address} (from {mesh_source} discoveryAddress)" in log, log
        assert f"control plane (xDS): {address} (from {mesh_source})" in log, log
        assert "credential source: CREDENTIAL_FETCHER_TYPE=JWT" in log
        dns_host, _, dns_port = env["DNS_PROXY_ADDR"].rpartition(":")
        assert f"dns: listening on {dns_host} port {dns_port} (udp+tcp)" in log, log
        assert "dns: upstreams " in log, log
        assert "readiness: not ready" in log  # before the certificate and the stream

        port.close()  # the probe fails: the transition and the probe's message are logged
        wait_for(lambda: logged("health: unhealthy: "), 10, "the unhealthy transition")
        line = next(r for r in proc.stderr().splitlines() if "health: unhealthy: " in r)
        assert str(port.port) in line, line
    finally:
        port.close()
