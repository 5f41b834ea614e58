"""Configuration files, end to end: bad files stop ``vmagent run`` with an error naming the
file and the key; Istio's onboarding files (``istioctl x workload entry configure`` output)
work unchanged, with only addresses, directories and credentials overridden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_helpers import FIXTURES, World, clean_env, dig, wait_for, write_yaml

# --- bad configuration ----------------------------------------------------------------------


def _run_agent(tmp_path: Path, **env: str) -> tuple[int, str]:
    """``vmagent run`` with every path under ``tmp_path`` and nothing to reach; (code, stderr)."""
    base = clean_env(
        VMAGENT_CONFIG_DIR=str(tmp_path / "etc"),
        VMAGENT_STATE_DIR=str(tmp_path / "state"),
        VMAGENT_RUN_DIR=str(tmp_path / "run"),
        VMAGENT_CLUSTER_ENV=os.devnull,
        VMAGENT_MESH_CONFIG=os.devnull,
        VMAGENT_STATUS_ADDR="127.0.0.1:1",
        DNS_PROXY_ADDR="127.0.0.1:2",  # not the status port: the ports of one agent differ
        ISTIO_SVC_IP="10.20.30.40",
        CA_ADDR="127.0.0.1:1",
    )
    base.update(env)
    done = subprocess.run(
        [sys.executable, "-m", "vmagent", "run"],
        env=base,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stderr


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_MESH_YAML = [
    # (content, what the message must name besides the file)
    ("defaultConfig:\n  discoveryAddress: [istiod:15012\n", ["not valid YAML", "line 2"]),
    ("- just\n- a list\n", ["defaultConfig"]),
    ("defaultConfig:\n  discoveryAddress: 15012\n", ["defaultConfig", "discoveryAddress"]),
    ("defaultConfig:\n  proxyMetadata: [a, b]\n", ["defaultConfig", "proxyMetadata"]),
    ("defaultConfig:\n  proxyMetadata:\n    ISTIO_META_DNS_CAPTURE: maybe\n", ["DNS_CAPTURE"]),
    (
        "defaultConfig:\n  readinessProbe:\n    tcpSocket: {port: 99999}\n",
        ["defaultConfig.readinessProbe.tcpSocket.port", "65535"],
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("content", "names"), BAD_MESH_YAML)
def test_bad_mesh_yaml_is_a_clear_error(tmp_path: Path, content: str, names: list[str]) -> None:
    mesh = _write(tmp_path / "garbage-mesh.yaml", content)
    code, stderr = _run_agent(tmp_path, VMAGENT_MESH_CONFIG=mesh)
    assert code != 0, stderr
    assert "garbage-mesh.yaml" in stderr, stderr
    for name in names:
        assert name in stderr, stderr
    assert "Traceback" not in stderr, stderr


BAD_CLUSTER_ENV = [
    ("POD_NAMESPACE='bar'\nTHIS LINE IS NOT AN ASSIGNMENT\n", [":2:", "expected KEY=value"]),
    ("POD_NAMESPACE='bar\n", [":1:", "POD_NAMESPACE", "quoting"]),
    ("ISTIO_META_DNS_CAPTURE='maybe'\n", ["ISTIO_META_DNS_CAPTURE", "'maybe'", "boolean"]),
    ("DNS_FORWARD_TIMEOUT='soon'\n", ["DNS_FORWARD_TIMEOUT", "duration"]),
    ("ISTIO_METAJSON_LABELS='{\"app\": '\n", ["ISTIO_METAJSON_LABELS", "JSON"]),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("content", "names"), BAD_CLUSTER_ENV)
def test_bad_cluster_env_is_a_clear_error(tmp_path: Path, content: str, names: list[str]) -> None:
    cluster_env = _write(tmp_path / "bad-cluster.env", content)
    code, stderr = _run_agent(tmp_path, VMAGENT_CLUSTER_ENV=cluster_env)
    assert code != 0, stderr
    for name in names:
        assert name in stderr, stderr
    assert "Traceback" not in stderr, stderr


BAD_PROBES = [
    ({"httpGet": {"port": "http"}}, "readinessProbe.httpGet.port", "integer"),
    ({"tcpSocket": {"port": 80}, "periodSecond": 5}, "readinessProbe.periodSecond", "unknown"),
    ({"tcpSocket": {"port": 80}, "exec": {"command": ["true"]}}, "readinessProbe", "only one"),
    ({"grpc": {"port": 70000}}, "readinessProbe.grpc.port", "65535"),
    ({"periodSeconds": 5}, "readinessProbe", "one of"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("probe", "key", "problem"), BAD_PROBES)
def test_bad_proxy_config_probe_is_a_clear_error(
    tmp_path: Path, probe: dict[str, Any], key: str, problem: str
) -> None:
    code, stderr = _run_agent(tmp_path, PROXY_CONFIG=json.dumps({"readinessProbe": probe}))
    assert code != 0, stderr
    assert f"PROXY_CONFIG: {key}" in stderr, stderr
    assert problem in stderr, stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.timeout(60)
def test_garbage_proxy_config_is_a_clear_error(tmp_path: Path) -> None:
    code, stderr = _run_agent(tmp_path, PROXY_CONFIG="readinessProbe: [")
    assert code != 0 and "PROXY_CONFIG: not valid YAML" in stderr, stderr
    code, stderr = _run_agent(tmp_path, PROXY_CONFIG="readinessProbe: 8080")
    assert code != 0 and "PROXY_CONFIG: readinessProbe: expected a mapping" in stderr, stderr


# --- Istio's onboarding files, unchanged ----------------------------------------------------


def _cluster_env(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        values[key] = value.strip("'")
    return values


def _config_show(env: dict[str, str]) -> dict[str, tuple[str, str]]:
    out = subprocess.run(
        [sys.executable, "-m", "vmagent", "config", "show"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    shown: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        key, rest = line.split(None, 1)
        value, _, source = rest.rpartition("  ")
        shown[key] = (value.strip(), source.strip())
    return shown


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_istio_onboarding_files_work_as_is(world: World, family: str) -> None:
    onboarding = FIXTURES / family
    assert (onboarding / "cluster.env").is_file(), f"missing fixtures at {onboarding}"
    istio = _cluster_env(onboarding / "cluster.env")
    namespace, account, ip = istio["POD_NAMESPACE"], istio["SERVICE_ACCOUNT"], istio["ISTIO_SVC_IP"]
    labels = json.loads(istio["ISTIO_METAJSON_LABELS"])
    group = istio["ISTIO_META_WORKLOAD_NAME"]
    # The WorkloadGroup the files were generated from, and an External service without
    # addresses (auto-allocated for DNS_CAPTURE proxies, as istiod does).
    write_yaml(
        world.config_dir / "onboarding.yaml",
        {
            "namespace": namespace,
            "workloadGroups": [
                {"name": group, "serviceAccount": account, "probe": {"httpGet": {"port": 8080}}}
            ],
            "services": [
                {
                    "host": "api.payments.example.com",
                    "registry": "External",
                    "resolution": "DNS",
                    "ports": [{"name": "https", "port": 443, "protocol": "TLS"}],
                }
            ],
        },
    )
    mesh = world.devmesh()
    # Only addresses, directories and credentials are overridden (the fixture's CA_ADDR and
    # discoveryAddress name istiod-rev-1); plus the auto-registration group of
    # `istioctl x workload entry configure --autoregister`.
    agent = world.agent(
        mesh,
        onboarding=onboarding,
        token_for=(namespace, account),
        ISTIO_META_AUTO_REGISTER_GROUP=group,
    )

    shown = _config_show(agent.env())
    from_file = f"file:{onboarding / 'cluster.env'}"
    for key in ("POD_NAMESPACE", "SERVICE_ACCOUNT", "ISTIO_SVC_IP", "ISTIO_META_CLUSTER_ID"):
        assert shown[key] == (repr(istio[key]), from_file), key
    assert shown["TRUST_DOMAIN"] == ("''", from_file)  # empty, not absent
    assert shown["ISTIO_META_DNS_CAPTURE"] == ("'true'", from_file)
    assert shown["CA_ADDR"] == (repr(mesh.address), "env")

    agent.start()
    agent.wait_ready()
    (connection,) = mesh.get("/debug/connections")["connections"]
    metadata = connection["metadata"]
    assert (
        connection["node"]
        == f"sidecar~{ip}~{metadata['NAME']}.{namespace}~{namespace}.svc.cluster.local"
    )
    assert metadata["NAMESPACE"] == namespace
    assert metadata["SERVICE_ACCOUNT"] == account
    assert metadata["INSTANCE_IPS"] == ip
    assert metadata["LABELS"] == labels
    assert metadata["WORKLOAD_NAME"] == group
    assert metadata["CLUSTER_ID"] == "Kubernetes"
    assert metadata["DNS_CAPTURE"] == "true"
    assert metadata["AUTO_REGISTER_GROUP"] == group
    if (onboarding / "mesh.yaml").exists():
        default = yaml.safe_load((onboarding / "mesh.yaml").read_text())["defaultConfig"]
        sent = metadata["PROXY_CONFIG"]
        assert sent["proxyMetadata"] == default["proxyMetadata"]
        assert (
            sent["readinessProbe"]["httpGet"]["port"]
            == default["readinessProbe"]["httpGet"]["port"]
        )
        assert sent["discoveryAddress"] == mesh.address  # PROXY_CONFIG over mesh.yaml

    entry_name = f"{group}-{ip.replace(':', '-')}"
    entry = wait_for(lambda: mesh.entry(entry_name), 5, f"WorkloadEntry {entry_name}")
    assert entry["metadata"]["namespace"] == namespace
    assert entry["spec"]["address"] == ip
    assert entry["spec"]["serviceAccount"] == account
    assert entry["metadata"]["labels"] == labels
    assert entry["metadata"]["annotations"]["proxy.istio.io/health-checks-enabled"] == "true"
    assert agent.status()["identity"]["spiffe_id"].endswith(f"/ns/{namespace}/sa/{account}")

    # DNS capture: the External service without addresses got an auto-allocated address.
    status, addresses = dig(agent.dns, "api.payments.example.com")
    assert status == "NOERROR" and len(addresses) == 1, (status, addresses)
    assert addresses[0].startswith("240.240."), addresses
