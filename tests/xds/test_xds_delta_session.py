"""The agent's own messages on a delta ADS stream (reference §3.2, §4.3): NameTable request
first with the node, ACK/NACK in delta form, health reports in delta form."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryResponse, Resource
from google.protobuf import any_pb2, json_format

from vmagent._proto import nds_pb2
from vmagent.health import HealthEvent as Health
from vmagent.xds.delta import DeltaAdsSession, delta_health_request
from vmagent.xds.session import HEALTH_TYPE, NAME_TABLE_TYPE, TablePush

GOOD = {"table": {"a.ns.svc.cluster.local": {"ips": ["10.0.0.1"], "registry": "Kubernetes"}}}
NODE = base_pb2.Node(id="sidecar~10.0.0.5~vm-1.ns~ns.svc.cluster.local")


def push(document: dict[str, object], nonce: str) -> DeltaDiscoveryResponse:
    table = json_format.ParseDict(document, nds_pb2.NameTable())
    packed = any_pb2.Any()
    packed.Pack(table)
    return DeltaDiscoveryResponse(
        type_url=NAME_TABLE_TYPE,
        nonce=nonce,
        system_version_info="sys",
        resources=[Resource(version="v-" + nonce, resource=packed)],
    )


def test_opening_is_the_name_table_with_the_node_then_health() -> None:
    first, second = DeltaAdsSession(NODE).opening(Health(False, "probe failed"))
    assert first.type_url == NAME_TABLE_TYPE and first.node.id == NODE.id
    assert not first.resource_names_subscribe and not first.response_nonce  # wildcard
    assert second.type_url == HEALTH_TYPE and not second.HasField("node")
    assert (second.error_detail.code, second.error_detail.message) == (13, "probe failed")
    assert len(DeltaAdsSession(NODE).opening(None)) == 1


def test_name_table_push_is_acked_with_type_and_nonce() -> None:
    result = DeltaAdsSession(NODE).on_response(push(GOOD, "n1"))
    assert isinstance(result, TablePush) and result.table is not None
    assert list(result.table) == ["a.ns.svc.cluster.local"] and result.version == "v-n1"
    assert (result.reply.type_url, result.reply.response_nonce) == (NAME_TABLE_TYPE, "n1")
    assert not result.reply.HasField("error_detail")


def test_bad_name_table_is_nacked_with_code_13() -> None:
    session = DeltaAdsSession(NODE)
    session.on_response(push(GOOD, "n1"))
    result = session.on_response(push({"table": {"x.example": {"ips": ["nope"]}}}, "n2"))
    assert isinstance(result, TablePush) and result.table is None
    assert result.reply.response_nonce == "n2" and result.reply.error_detail.code == 13
    assert "nope" in result.reply.error_detail.message
    assert session.accepted_nonce == "n1"


def test_corrupt_bytes_are_nacked_not_fatal() -> None:
    corrupt = DeltaDiscoveryResponse(type_url=NAME_TABLE_TYPE, nonce="n3")
    corrupt.resources.add(resource=any_pb2.Any(type_url=NAME_TABLE_TYPE, value=b"\xff\xff"))
    result = DeltaAdsSession(NODE).on_response(corrupt)
    assert isinstance(result, TablePush) and result.reply.error_detail.code == 13


def test_empty_push_changes_nothing_and_is_acked() -> None:
    empty = DeltaDiscoveryResponse(type_url=NAME_TABLE_TYPE, nonce="n4")
    result = DeltaAdsSession(NODE).on_response(empty)
    assert isinstance(result, TablePush) and result.table is None and result.error is None
    assert result.reply.response_nonce == "n4"


def test_other_types_are_acked_when_no_proxy_takes_them() -> None:
    other = DeltaDiscoveryResponse(type_url="type.googleapis.com/x.Y", nonce="n5")
    reply = DeltaAdsSession(NODE).on_response(other)
    assert not isinstance(reply, TablePush) and reply is not None
    assert (reply.type_url, reply.response_nonce) == ("type.googleapis.com/x.Y", "n5")


def test_health_request_forms() -> None:
    assert not delta_health_request(Health(True)).HasField("error_detail")
    bad = delta_health_request(Health(False, ""))
    assert bad.type_url == HEALTH_TYPE and bad.error_detail.code == 13
    assert bad.error_detail.message == "unhealthy"
