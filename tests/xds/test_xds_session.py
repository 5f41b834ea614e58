"""Node identity and the ADS session protocol, as Istio's agent speaks them."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
from google.protobuf import any_pb2, json_format

from vmagent._proto import nds_pb2
from vmagent.config import load_config
from vmagent.health import HealthEvent as Health
from vmagent.xds.node import NodeError, build_node, usable_ips
from vmagent.xds.session import (
    HEALTH_TYPE,
    NAME_TABLE_TYPE,
    AdsSession,
    TablePush,
    backoff_delay,
    health_request,
    name_table_document,
    node_message,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "istio-onboarding"


def onboarded_config(**environ: str):  # type: ignore[no-untyped-def]
    env = {"VMAGENT_MESH_CONFIG": str(FIXTURES / "ipv4" / "mesh.yaml"), **environ}
    return load_config(env, cluster_env=FIXTURES / "ipv4" / "cluster.env")


def test_node_from_istioctl_onboarding_files() -> None:
    node = build_node(onboarded_config(), "vm-1.example.internal", ["192.168.1.5"])
    # ISTIO_SVC_IP from cluster.env wins over the host's addresses.
    assert node.id == "sidecar~10.10.10.10~vm-1.bar~bar.svc.cluster.local"
    meta = node.metadata
    assert meta["NAMESPACE"] == "bar" and meta["NAME"] == "vm-1"
    assert meta["SERVICE_ACCOUNT"] == "vm-serviceaccount"
    assert meta["INSTANCE_IPS"] == "10.10.10.10"
    assert meta["CLUSTER_ID"] == "Kubernetes"
    assert meta["DNS_CAPTURE"] == "true"  # Istio's string form, not a JSON bool
    assert meta["WORKLOAD_NAME"] == "foo" and meta["NETWORK"] == ""
    assert meta["LABELS"] == {
        "service.istio.io/canonical-name": "foo",
        "service.istio.io/canonical-revision": "latest",
    }
    assert meta["PROXY_CONFIG"]["readinessProbe"] == {"httpGet": {"port": 8080}}
    assert meta["PROXY_CONFIG"]["discoveryAddress"] == "istiod-rev-1.istio-system.svc:15012"
    assert meta["PILOT_SAN"] == ["istiod-rev-1.istio-system.svc"]
    assert meta["ISTIO_VERSION"]
    assert node.cluster == "foo.bar"


def test_ipv6_onboarding_uses_the_v6_service_ip() -> None:
    config = load_config(
        {"VMAGENT_MESH_CONFIG": "/dev/null"}, cluster_env=FIXTURES / "ipv6" / "cluster.env"
    )
    node = build_node(config, "vm6", [])
    assert node.id.split("~")[1] == config.istio_svc_ip
    assert ":" in node.metadata["INSTANCE_IPS"]


def test_host_addresses_skip_loopback_and_link_local() -> None:
    assert usable_ips(["127.0.0.1", "fe80::1%eth0", "169.254.1.1", "10.0.0.5", "2001:db8::5"]) == [
        "10.0.0.5",
        "2001:db8::5",
    ]
    config = load_config({"VMAGENT_CLUSTER_ENV": "/dev/null", "VMAGENT_MESH_CONFIG": "/dev/null"})
    with pytest.raises(NodeError, match="ISTIO_SVC_IP"):
        build_node(config, "vm", ["127.0.0.1", "fe80::1"])


def test_auto_registration_metadata_and_json_errors() -> None:
    node = build_node(
        onboarded_config(ISTIO_META_AUTO_REGISTER_GROUP="vm-web", ISTIO_META_NETWORK="net1"),
        "vm",
        [],
    )
    assert node.metadata["AUTO_REGISTER_GROUP"] == "vm-web" and node.metadata["NETWORK"] == "net1"
    bad = onboarded_config(ISTIO_METAJSON_LABELS="{not json")
    with pytest.raises(NodeError, match="ISTIO_METAJSON_LABELS"):
        build_node(bad, "vm", [])


def test_node_message_keeps_string_values() -> None:
    node = build_node(onboarded_config(), "vm", [])
    message = node_message(node)
    as_dict = json_format.MessageToDict(message)
    assert as_dict["id"] == node.id
    assert as_dict["metadata"]["DNS_CAPTURE"] == "true"
    assert as_dict["metadata"]["INSTANCE_IPS"] == "10.10.10.10"


def name_table_response(table: dict[str, object], version: str, nonce: str) -> DiscoveryResponse:
    message = json_format.ParseDict(table, nds_pb2.NameTable())
    resource = any_pb2.Any()
    resource.Pack(message)
    return DiscoveryResponse(
        type_url=NAME_TABLE_TYPE, version_info=version, nonce=nonce, resources=[resource]
    )


GOOD = {"table": {"a.ns.svc.cluster.local": {"ips": ["10.0.0.1"], "registry": "Kubernetes"}}}


def test_session_opens_with_the_node_on_a_name_table_request_then_health() -> None:
    node = build_node(onboarded_config(), "vm", [])
    session = AdsSession(node_message(node))
    first, second = session.opening(Health(False, "probe failed"))
    assert first.type_url == NAME_TABLE_TYPE and first.node.id == node.id
    assert not first.resource_names and not first.version_info
    assert second.type_url == HEALTH_TYPE and not second.HasField("node")
    assert second.error_detail.code == 13 and second.error_detail.message == "probe failed"
    assert len(session.opening(None)) == 1


def test_name_table_push_is_acked_with_version_and_nonce() -> None:
    session = AdsSession(node_message(build_node(onboarded_config(), "vm", [])))
    result = session.on_response(name_table_response(GOOD, "v1", "n1"))
    assert isinstance(result, TablePush) and result.table is not None
    assert list(result.table) == ["a.ns.svc.cluster.local"]
    assert result.reply.version_info == "v1" and result.reply.response_nonce == "n1"
    assert not result.reply.HasField("error_detail")


def test_invalid_name_table_is_nacked_with_code_13_and_last_good_version() -> None:
    session = AdsSession(node_message(build_node(onboarded_config(), "vm", [])))
    session.on_response(name_table_response(GOOD, "v1", "n1"))
    bad = {"table": {"a.example": {"ips": ["not-an-ip"]}}}
    result = session.on_response(name_table_response(bad, "v2", "n2"))
    assert isinstance(result, TablePush) and result.table is None
    assert result.reply.error_detail.code == 13 and "not-an-ip" in result.reply.error_detail.message
    assert result.reply.version_info == "v1" and result.reply.response_nonce == "n2"


def test_undecodable_name_table_bytes_are_nacked_not_fatal() -> None:
    session = AdsSession(node_message(build_node(onboarded_config(), "vm", [])))
    session.on_response(name_table_response(GOOD, "v1", "n1"))
    corrupt = DiscoveryResponse(type_url=NAME_TABLE_TYPE, version_info="v2", nonce="n2")
    corrupt.resources.add(type_url=NAME_TABLE_TYPE, value=b"\xff\xff\xff\xff")
    result = session.on_response(corrupt)
    assert isinstance(result, TablePush) and result.table is None
    assert result.reply.error_detail.code == 13 and "NameTable" in result.reply.error_detail.message
    assert result.reply.version_info == "v1" and result.reply.response_nonce == "n2"


def test_health_request_forms() -> None:
    assert not health_request(Health(True)).HasField("error_detail")
    assert health_request(Health(False, "down")).error_detail.message == "down"


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    assert backoff_delay(1, 0.0) == 0.5 and backoff_delay(1, 0.999) < 1.0
    assert 4.0 <= backoff_delay(4, 0.5) <= 8.0
    assert backoff_delay(50, 0.999) <= 30.0


def test_table_document_round_trips_through_the_file_format() -> None:
    from vmagent.dns.table import parse_name_table

    table = parse_name_table(GOOD)
    assert parse_name_table(name_table_document(table)) == table
