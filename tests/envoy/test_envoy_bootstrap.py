"""The generated bootstrap and command line: shape (Istio's template and ``pkg/envoy``) and
acceptance by the real Envoy (``--mode validate`` with the very argv the supervisor runs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from envoy_helpers import make_config, make_node

from vmagent.config import ConfigError
from vmagent.envoy import build_bootstrap, command_line, envoy_options
from vmagent.envoy.binary import resolve_binary
from vmagent.envoy.bootstrap import all_ipv6, split_log_level
from vmagent.identity.sds import sds_socket_path


def validate(tmp_path: Path, bootstrap: dict[str, Any], argv: list[str]) -> str:
    """Run the argv the supervisor would run, in validate mode; Envoy's verdict."""
    path = Path(argv[argv.index("-c") + 1])
    path.write_text(json.dumps(bootstrap))
    done = subprocess.run(
        [*argv, "--mode", "validate"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def test_default_bootstrap_matches_istio_and_the_agent_node(tmp_path: Path) -> None:
    config = make_config(tmp_path, ISTIO_META_WORKLOAD_NAME="web", POD_NAMESPACE="shop")
    node = make_node(config)
    options = envoy_options(config)
    boot = build_bootstrap(node, options)

    # The node Envoy presents is exactly the agent's xDS node.
    assert boot["node"]["id"] == node.id == "sidecar~10.0.0.5~vm-1.shop~shop.svc.cluster.local"
    assert boot["node"]["cluster"] == node.cluster
    assert boot["node"]["metadata"] == json.loads(json.dumps(dict(node.metadata)))
    assert boot["admin"]["address"]["socket_address"] == {
        "protocol": "TCP",
        "address": "127.0.0.1",
        "port_value": 15000,
    }
    dynamic = boot["dynamic_resources"]
    assert dynamic["ads_config"] == {
        "api_type": "DELTA_GRPC",
        "transport_api_version": "V3",
        "set_node_on_first_message_only": True,
        "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
    }
    for kind in ("lds_config", "cds_config"):
        assert dynamic[kind] == {
            "ads": {},
            "initial_fetch_timeout": "0s",
            "resource_api_version": "V3",
        }

    clusters = by_name(boot["static_resources"]["clusters"])
    assert set(clusters) == {"prometheus_stats", "agent", "sds-grpc", "xds-grpc"}
    for name, socket in (("xds-grpc", options.xds_socket), ("sds-grpc", options.sds_socket)):
        cluster = clusters[name]
        assert cluster["connect_timeout"] == "1s" and cluster["type"] == "STATIC"
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"] == {"pipe": {"path": socket}}
        assert socket.startswith(str(tmp_path))  # under VMAGENT_RUN_DIR
        http = cluster["typed_extension_protocol_options"]
        assert "http2_protocol_options" in json.dumps(http)
    agent = clusters["agent"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert agent["address"]["socket_address"]["port_value"] == 15020
    stats = clusters["prometheus_stats"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert stats["endpoint"]["address"]["socket_address"]["port_value"] == 15000

    listeners = by_name(boot["static_resources"]["listeners"])
    assert set(listeners) == {"0.0.0.0_15090", "0.0.0.0_15021"}
    routes = {
        name: listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
            "virtual_hosts"
        ][0]["routes"][0]
        for name, listener in listeners.items()
    }
    assert routes["0.0.0.0_15021"] == {
        "match": {"prefix": "/healthz/ready"},
        "route": {"cluster": "agent"},
    }
    assert routes["0.0.0.0_15090"] == {
        "match": {"prefix": "/stats/prometheus"},
        "route": {"cluster": "prometheus_stats"},
    }


def test_command_line_follows_pkg_envoy(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        PROXY_CONFIG="drainDuration: 30s\nconcurrency: 3\n",
        VMAGENT_ENVOY_LOG_LEVEL="info,misc:error,upstream:debug",
    )
    options = envoy_options(config)
    argv = command_line("/bin/envoy", "/run/b.json", options, ["10.0.0.5"])
    assert argv == [
        "/bin/envoy",
        "-c", "/run/b.json",
        "--drain-time-s", "30",
        "--drain-strategy", "immediate",
        "--local-address-ip-version", "v4",
        "--file-flush-interval-msec", "1000",
        "--disable-hot-restart",
        "--allow-unknown-static-fields",
        "-l", "info",
        "--component-log-level", "misc:error,upstream:debug",
        "--concurrency", "3",
    ]  # fmt: skip
    # v6 only when every node IP is v6 (Istio's network.AllIPv6).
    assert "v6" in command_line("e", "b", options, ["fd00::5", "2001:db8::1"])
    assert "v6" not in command_line("e", "b", options, ["fd00::5", "10.0.0.5"])
    default = command_line("e", "b", envoy_options(make_config(tmp_path)), ["10.0.0.5"])
    assert default[default.index("--drain-time-s") + 1] == "45"
    assert "--concurrency" not in default and default[default.index("-l") + 1] == "warning"


def test_istio_helpers() -> None:
    assert split_log_level("warning") == ("warning", [])
    assert split_log_level("misc:error") == ("", ["misc:error"])
    assert not all_ipv6([]) and all_ipv6(["::1"]) and not all_ipv6(["::1", "127.0.0.1"])


@pytest.mark.parametrize(
    ("env", "ips", "api_type", "admin", "wildcard"),
    [
        ({}, ("10.0.0.5",), "DELTA_GRPC", "127.0.0.1", "0.0.0.0"),
        ({"ISTIO_DELTA_XDS": "false"}, ("10.0.0.5",), "GRPC", "127.0.0.1", "0.0.0.0"),
        ({"PROXY_CONFIG": "concurrency: 1"}, ("fd00::5",), "DELTA_GRPC", "::1", "::"),
        (
            {"ISTIO_DELTA_XDS": "0", "PROXY_CONFIG": "concurrency: 4\ndrainDuration: 1m"},
            ("10.0.0.5", "fd00::5"),
            "GRPC",
            "127.0.0.1",
            "0.0.0.0",
        ),
    ],
)
def test_real_envoy_accepts_each_variant(
    tmp_path: Path,
    env: dict[str, str],
    ips: tuple[str, ...],
    api_type: str,
    admin: str,
    wildcard: str,
) -> None:
    config = make_config(tmp_path, ISTIO_SVC_IP=",".join(ips), **env)
    node = make_node(config, ips)
    options = envoy_options(config)
    boot = build_bootstrap(node, options)
    assert boot["dynamic_resources"]["ads_config"]["api_type"] == api_type
    assert boot["admin"]["address"]["socket_address"]["address"] == admin
    assert {f"{wildcard}_15021", f"{wildcard}_15090"} == set(
        by_name(boot["static_resources"]["listeners"])
    )
    binary = resolve_binary("", "").path
    verdict = validate(tmp_path, boot, command_line(binary, options.bootstrap_path, options, ips))
    assert "OK" in verdict


def test_bad_proxy_config_values_name_the_key(tmp_path: Path) -> None:
    for text, key in (
        ("concurrency: many", "concurrency"),
        ("drainDuration: soon", "drainDuration"),
        ("terminationDrainDuration: -5s", "terminationDrainDuration"),
        ("proxyAdminPort: -1", "proxyAdminPort"),
    ):
        # Checked when the configuration loads (vmagent/proxyconfig.py), naming the source.
        with pytest.raises(ConfigError, match=f"PROXY_CONFIG: {key}"):
            envoy_options(make_config(tmp_path, PROXY_CONFIG=text))


def test_options_come_from_mesh_yaml_with_proxy_config_over_it(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(
        "defaultConfig:\n  terminationDrainDuration: 20s\n  proxyAdminPort: 15100\n"
        "  binaryPath: /opt/envoy\n  drainDuration: 10s\n"
    )
    config = make_config(
        tmp_path,
        PROXY_CONFIG="drainDuration: 1m30s",
        VMAGENT_STATUS_ADDR="127.0.0.2:16020",
        EXIT_ON_ZERO_ACTIVE_CONNECTIONS="true",
        MINIMUM_DRAIN_DURATION="2s",
        ENVOY_BINARY="/usr/bin/envoy",
    )
    options = envoy_options(config)
    assert options.termination_drain_duration == 20.0 and options.drain_duration == 90.0
    assert options.admin_port == 15100
    assert (options.binary_path, options.env_binary) == ("/opt/envoy", "/usr/bin/envoy")
    assert (options.status_host, options.status_port) == ("127.0.0.2", 16020)
    assert options.exit_on_zero_active_connections and options.minimum_drain_duration == 2.0
    # The SDS socket is the one the agent's SDS server listens on.
    assert options.sds_socket == str(sds_socket_path(config))
    boot = build_bootstrap(make_node(config), options)
    assert boot["admin"]["address"]["socket_address"]["port_value"] == 15100
