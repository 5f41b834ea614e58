"""The pure data-plane core: what devmesh tells Envoy, checked field by field against Istio's
shapes (``pilot/pkg/networking/core``), plus the delta session's subscription rules
(``pilot/pkg/xds/delta.go``). Envoy itself accepts these: test_devmesh_dataplane_envoy.py."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.discovery.v3 import discovery_pb2

from vmagent.devmesh.dataplane import CLUSTER, ENDPOINT, LISTENER, ROUTE, build_dataplane
from vmagent.devmesh.dataplane_model import DataplaneOptions
from vmagent.devmesh.delta import DeltaSession, RespondNames
from vmagent.devmesh.node import parse_node
from vmagent.devmesh.registry import Registry
from vmagent.devmesh.services import MeshConfig, merge, parse_document
from vmagent.devmesh.session import Ack, Respond

from .devmesh_xds_helpers import node

MESH = """
namespace: vm
workloadGroups:
  - name: web
    labels: {app: web}
    serviceAccount: web
    template: {ports: {http: 8080}, weight: 3}
    probe: {tcpSocket: {port: 8080}}
  - name: api
    labels: {app: api}
    template: {ports: {grpc: 9090}}
services:
  - host: web.vm.svc.cluster.local
    addresses: [10.96.1.10]
    ports: [{name: http, port: 80, protocol: HTTP}]
    workloadSelector: {app: web}
  - host: web-alias.vm.svc.cluster.local
    addresses: [10.96.1.10]          # same VIP: its domain goes to the first service only
    ports: [{name: http, port: 80, protocol: HTTP}]
  - host: api.vm.svc.cluster.local
    addresses: [10.96.1.12]
    ports: [{name: grpc, port: 9090, protocol: GRPC}]
    workloadSelector: {app: api}
    endpoints:
      - {address: 10.0.9.1, labels: {security.istio.io/tlsMode: istio}}
      - {address: 10.0.9.2, ready: false}
      - {address: 10.0.9.3, network: other}
      - {address: 10.0.9.4}
"""


def config() -> MeshConfig:
    return merge([parse_document(yaml.safe_load(MESH), "", "mesh.yaml")], ["mesh.yaml"])


def unpack(resources: dict[str, Any], message: Any) -> dict[str, Any]:
    out = {}
    for name, resource in resources.items():
        item = message()
        assert resource.any.Unpack(item)
        out[name] = item
    return out


def registered(health: bool | None = None) -> tuple[Registry, Any, Any]:
    """A registry with the web VM connected (and reported healthy/unhealthy if given)."""
    cfg = config()
    proxy = parse_node(node("10.0.0.5", "web-0", "vm", AUTO_REGISTER_GROUP="web", NETWORK="n1"))
    registry = Registry()
    entry = registry.connect("s1", proxy, cfg, 1000.0)
    if health is not None:
        registry.report_health("s1", health, "", 1001.0)
        entry = registry.entry_of("s1")
    return registry, proxy, entry


def build(health: bool | None = True, **options: Any) -> dict[str, dict[str, Any]]:
    registry, proxy, entry = registered(health)
    return build_dataplane(config(), registry.entries(), proxy, entry, DataplaneOptions(**options))


def test_outbound_cluster_uses_istio_mtls_from_sds() -> None:
    clusters = unpack(build()[CLUSTER], cluster_pb2.Cluster)
    web = clusters["outbound|80||web.vm.svc.cluster.local"]
    assert web.type == cluster_pb2.Cluster.EDS
    assert web.eds_cluster_config.service_name == web.name
    assert web.eds_cluster_config.eds_config.HasField("ads")
    istio, plain = web.transport_socket_matches
    assert dict(istio.match.fields).keys() == {"tlsMode"}
    assert istio.match.fields["tlsMode"].string_value == "istio"
    assert not plain.match.fields and plain.transport_socket.name.endswith("raw_buffer")
    tls = tls_pb2.UpstreamTlsContext()
    assert istio.transport_socket.typed_config.Unpack(tls)
    assert tls.sni == "outbound_.80_._.web.vm.svc.cluster.local"
    common = tls.common_tls_context
    assert list(common.alpn_protocols) == ["istio-peer-exchange", "istio"]
    (cert,) = common.tls_certificate_sds_secret_configs
    root = common.combined_validation_context.validation_context_sds_secret_config
    assert (cert.name, root.name) == ("default", "ROOTCA")
    for sds in (cert, root):
        (grpc_service,) = sds.sds_config.api_config_source.grpc_services
        assert grpc_service.envoy_grpc.cluster_name == "sds-grpc"
    inbound = clusters["inbound|8080||"]
    address = inbound.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert (address.socket_address.address, address.socket_address.port_value) == (
        "127.0.0.1",
        8080,
    )
    assert {"PassthroughCluster", "BlackHoleCluster"} <= set(clusters)


def endpoints(assignment: endpoint_pb2.ClusterLoadAssignment) -> list[tuple[str, int, bool, int]]:
    return [
        (
            e.endpoint.address.socket_address.address,
            e.endpoint.address.socket_address.port_value,
            "envoy.transport_socket_match" in e.metadata.filter_metadata,
            e.load_balancing_weight.value,
        )
        for group in assignment.endpoints
        for e in group.lb_endpoints
    ]


def test_endpoints_are_healthy_entries_and_ready_static_endpoints_on_the_network() -> None:
    cla = unpack(build(True)[ENDPOINT], endpoint_pb2.ClusterLoadAssignment)
    # A WorkloadEntry is a mesh endpoint on its own port for the service port's name.
    assert endpoints(cla["outbound|80||web.vm.svc.cluster.local"]) == [("10.0.0.5", 8080, True, 3)]
    # Static: ready ones on the proxy's network (or none given); mTLS only when labelled.
    assert endpoints(cla["outbound|9090||api.vm.svc.cluster.local"]) == [
        ("10.0.9.1", 9090, True, 0),
        ("10.0.9.4", 9090, False, 0),
    ]
    for health in (None, False):  # not yet reported, or unhealthy: not an endpoint
        cla = unpack(build(health)[ENDPOINT], endpoint_pb2.ClusterLoadAssignment)
        assert endpoints(cla["outbound|80||web.vm.svc.cluster.local"]) == []


def test_without_capture_mesh_endpoints_are_reached_on_the_inbound_listener() -> None:
    cla = unpack(
        build(True, capture=False, inbound_port=16006)[ENDPOINT],
        endpoint_pb2.ClusterLoadAssignment,
    )
    assert endpoints(cla["outbound|80||web.vm.svc.cluster.local"]) == [("10.0.0.5", 16006, True, 3)]
    assert ("10.0.9.4", 9090, False, 0) in endpoints(cla["outbound|9090||api.vm.svc.cluster.local"])


def hcm_of(chain: Any) -> hcm_pb2.HttpConnectionManager:
    manager = hcm_pb2.HttpConnectionManager()
    assert chain.filters[0].typed_config.Unpack(manager)
    return manager


def test_listeners_capture_outbound_and_terminate_mtls_inbound() -> None:
    listeners = unpack(build()[LISTENER], listener_pb2.Listener)
    outbound = listeners["virtualOutbound"]
    assert outbound.address.socket_address.port_value == 15001
    assert outbound.address.socket_address.address == "0.0.0.0"
    assert outbound.use_original_dst.value
    port80 = listeners["0.0.0.0_80"]
    assert not port80.bind_to_port.value and port80.HasField("bind_to_port")
    assert hcm_of(port80.filter_chains[0]).rds.route_config_name == "80"

    inbound = listeners["virtualInbound"]
    # No hand-off to an outbound 0.0.0.0_<port> listener (tests/e2e/test_e2e_two_vms.py).
    assert inbound.address.socket_address.port_value == 15006
    assert not inbound.use_original_dst.value
    assert [f.name for f in inbound.listener_filters] == [
        "envoy.filters.listener.original_dst",
        "envoy.filters.listener.tls_inspector",
    ]
    (chain,) = inbound.filter_chains
    match = chain.filter_chain_match
    assert match.destination_port.value == 8080 and match.transport_protocol == "tls"
    assert {"istio", "istio-peer-exchange"} <= set(match.application_protocols)
    tls = tls_pb2.DownstreamTlsContext()
    assert chain.transport_socket.typed_config.Unpack(tls)
    assert tls.require_client_certificate.value
    assert list(tls.common_tls_context.alpn_protocols) == ["istio-peer-exchange", "h2", "http/1.1"]
    assert tls.common_tls_context.tls_certificate_sds_secret_configs[0].name == "default"
    manager = hcm_of(chain)
    assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.APPEND_FORWARD
    assert manager.set_current_client_cert_details.uri
    route = manager.route_config.virtual_hosts[0].routes[0].route
    assert route.cluster == "inbound|8080||"
    assert inbound.default_filter_chain.filters[0].name == "envoy.filters.network.tcp_proxy"


def test_without_capture_ports_bind_and_inbound_chains_match_the_sni() -> None:
    listeners = unpack(
        build(True, capture=False, listen_address="127.0.0.1", outbound_bind="127.0.0.9")[LISTENER],
        listener_pb2.Listener,
    )
    port80 = listeners["0.0.0.0_80"]
    assert port80.bind_to_port.value
    assert port80.address.socket_address.address == "127.0.0.9"
    inbound = listeners["virtualInbound"]
    assert not inbound.use_original_dst.value
    (chain,) = inbound.filter_chains
    assert list(chain.filter_chain_match.server_names) == [
        "outbound_.80_._.web.vm.svc.cluster.local"
    ]
    assert not chain.filter_chain_match.HasField("destination_port")


def test_routes_by_host_short_names_and_vip_without_duplicate_domains() -> None:
    routes = unpack(build()[ROUTE], route_pb2.RouteConfiguration)
    assert set(routes) == {"80", "9090"}
    hosts = {v.name: v for v in routes["80"].virtual_hosts}
    web = hosts["web.vm.svc.cluster.local:80"]
    assert {"web.vm.svc.cluster.local", "web", "web.vm", "10.96.1.10", "10.96.1.10:80"} <= set(
        web.domains
    )
    assert web.routes[0].route.cluster == "outbound|80||web.vm.svc.cluster.local"
    alias = hosts["web-alias.vm.svc.cluster.local:80"]
    assert "10.96.1.10" not in alias.domains  # Envoy NACKs a domain used twice
    every = [d for v in routes["80"].virtual_hosts for d in v.domains]
    assert len(every) == len(set(every))
    assert hosts["allow_any"].domains == ["*"]


def test_versions_are_content_hashes() -> None:
    first, again, changed = build(True), build(True), build(False)
    eds = "outbound|80||web.vm.svc.cluster.local"
    assert first[ENDPOINT][eds].version == again[ENDPOINT][eds].version
    assert first[ENDPOINT][eds].version != changed[ENDPOINT][eds].version
    assert first[CLUSTER].keys() == changed[CLUSTER].keys()
    assert all(first[CLUSTER][n].version == changed[CLUSTER][n].version for n in first[CLUSTER])


def delta_request(type_url: str, **fields: Any) -> discovery_pb2.DeltaDiscoveryRequest:
    return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, **fields)


def test_delta_session_subscriptions_follow_istiod() -> None:
    session = DeltaSession("1", "peer", time.time())
    current = build()[ENDPOINT]
    web, api = "outbound|80||web.vm.svc.cluster.local", "outbound|9090||api.vm.svc.cluster.local"
    assert session.receive_delta(delta_request(ENDPOINT, resource_names_subscribe=[web]), 1.0) == (
        Respond(ENDPOINT)
    )
    first = session.delta_response(ENDPOINT, current, 1.0, full=True)
    assert first is not None and [r.name for r in first.resources] == [web]
    ack = delta_request(ENDPOINT, response_nonce=first.nonce)
    assert isinstance(session.receive_delta(ack, 1.0), Ack)
    # Unchanged push: nothing to send.
    assert session.delta_response(ENDPOINT, current, 2.0) is None
    # Adding a name answers with that name only; unsubscribing alone is not answered.
    added = session.receive_delta(delta_request(ENDPOINT, resource_names_subscribe=[api]), 2.0)
    assert added == RespondNames(ENDPOINT, (api,))
    removal = delta_request(ENDPOINT, resource_names_unsubscribe=[api])
    assert isinstance(session.receive_delta(removal, 2.0), Ack)
    # Stale nonce: ignored.
    stale = session.receive_delta(delta_request(ENDPOINT, response_nonce="nope"), 2.0)
    assert type(stale).__name__ == "Stale"
    # A changed resource is pushed alone; a deleted one is removed.
    changed = dict(current)
    changed[web] = dataclasses.replace(current[web], version="other")
    push = session.delta_response(ENDPOINT, changed, 3.0)
    assert push is not None and [r.name for r in push.resources] == [web]
    del changed[web]
    gone = session.delta_response(ENDPOINT, changed, 4.0)
    assert gone is not None and list(gone.removed_resources) == [web] and not gone.resources
