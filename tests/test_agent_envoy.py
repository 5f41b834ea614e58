"""``vmagent run``'s Envoy wiring without processes: what the agent builds for each setting,
the readiness and health pre-check while Envoy is not LIVE, and the certificate relay SDS
serves from (the identity part builds its manager after SDS listens)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vmagent.agent import Agent, build_agent
from vmagent.agent_envoy import CertRelay
from vmagent.config import ConfigError, load_config
from vmagent.identity.certs import CertBundle


def config(tmp_path: Path, **env: str) -> object:
    environ = {
        "VMAGENT_CONFIG_DIR": str(tmp_path),
        "VMAGENT_RUN_DIR": str(tmp_path / "run"),
        "VMAGENT_STATE_DIR": str(tmp_path / "state"),
        "VMAGENT_CLUSTER_ENV": "/dev/null",
        "VMAGENT_MESH_CONFIG": "/dev/null",
        "POD_NAMESPACE": "vm",
        "ISTIO_SVC_IP": "10.0.0.5",
        "PROXY_CONFIG": "discoveryAddress: 127.0.0.1:15012\n"
        "readinessProbe: {tcpSocket: {port: 8080}}",
        **env,
    }
    return load_config(environ)


def agent(tmp_path: Path, **env: str) -> Agent:
    return build_agent(config(tmp_path, **env))  # type: ignore[arg-type]


def bundle(serial: int) -> CertBundle:
    return CertBundle(b"key", b"chain", b"root", ("spiffe://x/ns/vm/sa/a",), serial, 0, 1, 0)


def test_envoy_off_builds_no_data_plane_and_a_sotw_stream(tmp_path: Path) -> None:
    built = agent(tmp_path, VMAGENT_ENVOY="false")
    assert built.dataplane is None and built.xds.kind == "sotw"
    state = built.state()
    assert state["envoy"] is None and state["xds_proxy"] is None
    assert not any("Envoy" in reason for reason in state["not_ready"])


def test_envoy_on_joins_readiness_and_the_health_pre_check(tmp_path: Path) -> None:
    built = agent(tmp_path)
    assert built.dataplane is not None and built.xds.kind == "delta"
    assert built.xds.relay is built.dataplane.proxy  # Envoy's ADS rides the one stream
    assert "Envoy not ready: Envoy not started yet" in built.not_ready()
    assert built.state()["envoy"] == {"state": "not started"}
    assert built.health is not None
    event = asyncio.run(built.health.check_once())  # Envoy's check runs before the TCP probe
    assert event is not None and not event.healthy and "Envoy not ready" in event.message
    assert built.xds.status.health == event  # what goes to the control plane


def test_a_bad_envoy_setting_is_a_configuration_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PROXY_CONFIG: proxyAdminPort: expected a whole number"):
        agent(tmp_path, PROXY_CONFIG="discoveryAddress: 127.0.0.1:15012\nproxyAdminPort: abc")


def test_cert_relay_serves_the_latest_bundle_to_current_subscribers() -> None:
    relay = CertRelay()
    seen: list[int] = []
    unsubscribe = relay.subscribe(lambda b: seen.append(b.serial))
    assert relay.current is None
    relay.publish(bundle(1))
    unsubscribe()
    relay.publish(bundle(2))
    assert seen == [1] and relay.current is not None and relay.current.serial == 2
    unsubscribe()  # twice is harmless
