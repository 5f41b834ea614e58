"""Settings that vmagent only passes on (to Envoy's command line, into SPIFFE IDs and CSRs, to
a TLS name check) are checked at load like every number, and errors name what the user typed:
the flag for a flag, the layer a value really came from (issue 7 §2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmagent.config import ConfigError, load_config
from vmagent.config_names import ENVOY_LOG_LEVELS
from vmagent.envoy.binary import resolve_binary

NO_FILES = {"VMAGENT_CLUSTER_ENV": os.devnull, "VMAGENT_MESH_CONFIG": os.devnull}


def load_error(environ: dict[str, str], **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config({**NO_FILES, **environ}, **kwargs)
    return str(info.value)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmagent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **NO_FILES, **env},
        check=False,
    )


# --- Envoy's log level -----------------------------------------------------------------------


def test_a_log_level_envoy_refuses_is_refused_by_config_show() -> None:
    # Used to be accepted; Envoy then exited 1 ("invalid log level specified 'foo'"), forever.
    shown = run_cli("config", "show", VMAGENT_ENVOY_LOG_LEVEL="foo")
    assert shown.returncode == 2, shown.stdout
    assert "VMAGENT_ENVOY_LOG_LEVEL='foo' (from env): 'foo': Envoy's log levels are trace" in (
        shown.stderr
    )
    for bad in ("info,upstream:foo", "info,up:stream:debug", "info,Upstream!:debug"):
        assert "VMAGENT_ENVOY_LOG_LEVEL" in load_error({"VMAGENT_ENVOY_LOG_LEVEL": bad})


@pytest.mark.parametrize("level", ENVOY_LOG_LEVELS)
def test_every_accepted_level_is_accepted_by_the_real_envoy(level: str, tmp_path: Path) -> None:
    """The list is Envoy's: each level, alone and for a component, passes Envoy's own check."""
    setting = f"{level},upstream:{level}"
    config = load_config({**NO_FILES, "VMAGENT_ENVOY_LOG_LEVEL": setting})
    envoy = resolve_binary("", "", False).path
    argv = [envoy, "--mode", "validate", "--config-yaml", "{}", "-l", level]
    argv += ["--component-log-level", f"upstream:{level}", "--base-id-path", str(tmp_path / "id")]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert config.vmagent_envoy_log_level == setting


@pytest.mark.parametrize(
    ("proxy_config", "expected"),
    [
        ("concurrency: -1", "concurrency: expected a whole number"),
        ("concurrency: 100000", "concurrency: must be between 0 and 4096"),
        ("proxyAdminPort: 70000", "proxyAdminPort: must be between 0 and 65535"),
        ("proxyAdminPort: abc", "proxyAdminPort: expected a whole number"),
        ("drainDuration: forever", "drainDuration: expected a duration"),
        ("terminationDrainDuration: 100h", "terminationDrainDuration: must be at most 1h"),
        ("discoveryAddress: '::::'", "write an IPv6 address as [ADDRESS]:PORT"),
        ("discoveryAddress: 'bad host:15012'", "neither a DNS name nor an IP"),
    ],
)
def test_proxy_config_fields_given_to_envoy_are_checked_at_load(
    proxy_config: str, expected: str
) -> None:
    message = load_error({"PROXY_CONFIG": proxy_config})
    assert message.startswith("env PROXY_CONFIG: "), message
    assert expected in message, message


# --- where a value came from -----------------------------------------------------------------


def test_proxy_config_metadata_is_blamed_on_proxy_config_not_on_a_missing_mesh_yaml(
    tmp_path: Path,
) -> None:
    # Used to say "(from mesh:D/mesh.yaml)", a file that does not exist.
    env = {"VMAGENT_CONFIG_DIR": str(tmp_path), "VMAGENT_CLUSTER_ENV": os.devnull}
    proxy = '{proxyMetadata: {SECRET_TTL: "0s"}}'
    shown = run_cli("config", "show", **env, PROXY_CONFIG=proxy)
    assert shown.returncode == 2
    assert "SECRET_TTL='0s' (from env PROXY_CONFIG): must be between 10s" in shown.stderr
    assert "mesh:" not in shown.stderr
    # Each layer keeps its own label: mesh.yaml's, and PROXY_CONFIG written in cluster.env.
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("defaultConfig:\n  proxyMetadata:\n    SECRET_TTL: 2s\n")
    assert f"SECRET_TTL='2s' (from mesh:{mesh})" in load_error(
        {"VMAGENT_CONFIG_DIR": str(tmp_path), "VMAGENT_MESH_CONFIG": str(mesh)}
    )
    cluster_env = tmp_path / "cluster.env"
    cluster_env.write_text(f"PROXY_CONFIG='{proxy}'\n")
    message = load_error({"VMAGENT_CLUSTER_ENV": str(cluster_env)})
    assert f"SECRET_TTL='0s' (from PROXY_CONFIG from file:{cluster_env})" in message
    config = load_config({**NO_FILES, "PROXY_CONFIG": '{proxyMetadata: {SECRET_TTL: "1h"}}'})
    assert config.sources["SECRET_TTL"] == "env PROXY_CONFIG"


def test_flag_errors_name_the_flags_not_the_variables(tmp_path: Path) -> None:
    table = tmp_path / "names.json"
    table.write_text("{}")
    done = run_cli("dns", "serve", "--name-table", str(table), "--listen", "10.1.2.3:53")
    assert done.returncode == 2, done.stderr
    assert "--listen '10.1.2.3:53': not a loopback address" in done.stderr, done.stderr
    assert "needs --allow-non-loopback" in done.stderr, done.stderr
    assert "DNS_PROXY_ADDR" not in done.stderr and "VMAGENT_DNS_ALLOW" not in done.stderr
    done = run_cli("dns", "serve", "--name-table", str(table), "--ttl", "-5")
    assert "--ttl '-5': must be between 0 and" in done.stderr, done.stderr
    # The same value from the environment names the variables.
    done = run_cli("dns", "serve", "--name-table", str(table), DNS_PROXY_ADDR="10.1.2.3:53")
    assert "DNS_PROXY_ADDR='10.1.2.3:53' (from env)" in done.stderr, done.stderr
    assert "needs --allow-non-loopback" in done.stderr, done.stderr  # this command's switch


# --- values that load but cannot work ---------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"VMAGENT_ENVOY_READINESS_PORT": "15020"}, "port 15020 is used twice: status endpoint"),
        ({"VMAGENT_ENVOY_PROMETHEUS_PORT": "15021"}, "port 15021 is used twice: Envoy readiness"),
        ({"DNS_PROXY_ADDR": "127.0.0.1:15020"}, "port 15020 is used twice: status endpoint"),
        ({"PROXY_CONFIG": "proxyAdminPort: 15090"}, "ProxyConfig proxyAdminPort"),
        (
            {"ISTIO_INBOUND_PORTS": "*", "INBOUND_CAPTURE_PORT": "15021"},
            "Envoy inbound capture (INBOUND_CAPTURE_PORT",
        ),
    ],
)
def test_the_agents_ports_must_not_collide(env: dict[str, str], expected: str) -> None:
    message = load_error(env)
    assert expected in message and "must differ" in message, message


def test_ports_that_cannot_clash_are_accepted() -> None:
    apart = {"VMAGENT_STATUS_ADDR": "127.0.0.1:15020", "DNS_PROXY_ADDR": "127.0.0.2:15020"}
    assert load_config({**NO_FILES, **apart}).dns_proxy_addr == ("127.0.0.2:15020",)
    # Without Envoy its ports are nobody's.
    no_envoy = {"VMAGENT_ENVOY": "false", "VMAGENT_ENVOY_READINESS_PORT": "15020"}
    assert load_config({**NO_FILES, **no_envoy}).vmagent_envoy_readiness_port == 15020


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("TRUST_DOMAIN", "a/b", "expected a SPIFFE trust domain"),
        ("TRUST_DOMAIN", "Cluster.Local", "expected a SPIFFE trust domain"),
        ("CA_ADDR", "::::", "write an IPv6 address as [ADDRESS]:PORT"),
        ("CA_ADDR", "istiod.istio-system.svc", "no port"),
        ("CA_ADDR", "[not-v6]:15012", "is not an IPv6 address"),
        ("POD_NAMESPACE", "ns 1", "expected a Kubernetes name such as my-ns"),
        ("ISTIO_NAMESPACE", "NS", "expected a Kubernetes name such as my-ns"),
        ("POD_NAMESPACE", "a" * 64, "at most 63 characters"),
        ("SERVICE_ACCOUNT", "my_sa", "expected a Kubernetes name such as my-app"),
        ("SERVICE_ACCOUNT", "", "expected a Kubernetes name"),
        ("ISTIOD_SAN", "istiod istio", "expected a DNS name"),
        ("VMAGENT_CLUSTER_DOMAIN", "cluster..local", "expected a DNS name"),
        ("ISTIO_SVC_IP", "10.0.0.300", "expected IP addresses"),
        ("VMAGENT_DNS_SEARCH", "ns1.svc.cluster.local bad/domain", "expected domains"),
    ],
)
def test_names_passed_on_are_checked(key: str, raw: str, expected: str) -> None:
    message = load_error({key: raw})
    assert message.startswith(f"{key}={raw!r} (from env): "), message
    assert expected in message, message


def test_names_istio_writes_still_load() -> None:
    config = load_config(
        {
            **NO_FILES,
            "TRUST_DOMAIN": "",  # istioctl writes it empty
            "CA_ADDR": "[fd00::1]:15012",
            "POD_NAMESPACE": "ns-1",
            "SERVICE_ACCOUNT": "vm.sa-1",
            "ISTIOD_SAN": "istiod.istio-system.svc",
            "ISTIO_SVC_IP": "10.0.0.5,fd00::5",
            "VMAGENT_ENVOY_LOG_LEVEL": "warn,misc:error,upstream:debug",
        }
    )
    assert config.trust_domain == "" and config.ca_address == "[fd00::1]:15012"
    assert load_config({**NO_FILES, "CA_ADDR": "10.0.0.1:15012"}).ca_addr == "10.0.0.1:15012"
