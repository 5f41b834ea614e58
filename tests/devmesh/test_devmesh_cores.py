"""The dev control plane's pure cores: config loading and its errors, the istiod-like
NameTable builder, the auto-registration state machine, node parsing and xDS session rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from vmagent.devmesh.nametable import build_name_table
from vmagent.devmesh.node import NodeError, ProxyNode, parse_node
from vmagent.devmesh.registry import RegistrationError, Registry, entry_name
from vmagent.devmesh.services import ConfigFileError, MeshConfig, load_directory
from vmagent.devmesh.session import (
    HEALTH_INFO,
    NAME_TABLE,
    Ack,
    Health,
    Nack,
    Respond,
    Session,
    Stale,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "devmesh"


def proxy(namespace: str, ip: str = "10.0.0.9", **meta: Any) -> ProxyNode:
    metadata = {"DNS_CAPTURE": "true", **meta}
    return ProxyNode(
        id=f"sidecar~{ip}~p.{namespace}~{namespace}.svc.cluster.local",
        type="sidecar",
        ips=(ip,),
        name="p",
        namespace=namespace,
        domain=f"{namespace}.svc.cluster.local",
        metadata=metadata,
    )


def config(tmp_path: Path, text: str) -> MeshConfig:
    (tmp_path / "mesh.yaml").write_text(text)
    return load_directory(tmp_path)


def table(cfg: MeshConfig, node: ProxyNode, registry: Registry | None = None) -> dict[str, Any]:
    entries = registry.entries() if registry else ()
    return dict(json_format.MessageToDict(build_name_table(cfg, entries, node)).get("table", {}))


# --- config files ---


def test_shipped_example_loads_and_builds() -> None:
    cfg = load_directory(EXAMPLES)
    assert cfg.group("vm", "vm-web") is not None
    assert cfg.group("vm", "vm-web").probe["httpGet"]["port"] == 8080  # type: ignore[union-attr,index]
    names = table(cfg, proxy("vm"))
    assert "ratings.bookinfo.svc.cluster.local" not in names  # exportTo "."
    assert "ratings.bookinfo.svc.cluster.local" in table(cfg, proxy("bookinfo"))
    assert names["*.partner.example.com"]["ips"] == ["10.200.0.10"]
    assert names["mysql.bookinfo.svc.cluster.local"]["ips"] == ["10.244.1.5", "10.244.2.7"]
    assert names["mysql-0.mysql.bookinfo.svc.cluster.local"]["shortname"] == "mysql-0.mysql"
    assert "corp.example.internal" not in names  # CIDR-only


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: [\n", r"mesh.yaml: invalid YAML"),
        ("servces: []\n", r"mesh.yaml: servces: unknown key"),
        (
            "services:\n  - {host: a.b.svc.cluster.local}\n",
            r"mesh.yaml: services\[0\].namespace: required",
        ),
        (
            "namespace: x\nservices:\n  - {host: a.x, ports: [{port: http}]}\n",
            r"mesh.yaml: services\[0\].ports\[0\].port: expected an integer 1-65535, got 'http'",
        ),
        (
            "namespace: x\nservices:\n  - {host: a.x, adresses: []}\n",
            r"services\[0\].adresses: unknown key",
        ),
        (
            "namespace: x\nservices:\n  - {host: a.x, addresses: [10.0.0.300]}\n",
            r"addresses\[0\]: expected an IP",
        ),
        (
            "namespace: x\nservices:\n  - {host: '*.x'}\n",
            r"services\[0\].host: a Kubernetes service cannot",
        ),
        (
            "namespace: x\nworkloadGroups:\n  - {name: g, probe: {}}\n",
            r"workloadGroups\[0\].probe: expected exactly one",
        ),
        (
            "namespace: x\nworkloadGroups:\n  - {name: g, probe: {httpGet: {path: /}}}\n",
            r"probe.httpGet.port: expected an integer",
        ),
        (
            "namespace: x\nsidecars:\n  - {egress: ['*']}\n",
            r"sidecars\[0\].egress\[0\]: expected 'namespace/dnsName'",
        ),
        ("- 1\n", r"mesh.yaml: expected a mapping"),
    ],
)
def test_bad_files_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigFileError, match=message):
        config(tmp_path, text)


def test_duplicates_across_files_name_both(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "namespace: x\nservices: [{host: s.x, addresses: [1.1.1.1]}]\n"
    )
    (tmp_path / "b.yml").write_text("namespace: x\nservices: [{host: s.x, addresses: [1.1.1.2]}]\n")
    with pytest.raises(ConfigFileError, match=r"b.yml: duplicate service x/s.x \(also in a.yaml\)"):
        load_directory(tmp_path)
    with pytest.raises(ConfigFileError, match="not a directory"):
        load_directory(tmp_path / "missing")


# --- NameTable ---


def test_visibility_sidecar_and_export(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        """
services:
  - {host: a.one.svc.cluster.local, namespace: one, addresses: [10.0.1.1]}
  - {host: b.two.svc.cluster.local, namespace: two, addresses: [10.0.2.1], exportTo: [one]}
  - {host: c.two.svc.cluster.local, namespace: two, addresses: [10.0.2.2], exportTo: ["~"]}
  - {host: db.example.com, namespace: ext, registry: External, addresses: [10.9.0.1]}
sidecars:
  - {namespace: one, egress: ["./*", "two/*", "*/*.example.com"]}
  - {namespace: istio-system, egress: ["./*"]}
""",
    )
    assert set(table(cfg, proxy("one"))) == {
        "a.one.svc.cluster.local", "b.two.svc.cluster.local", "db.example.com",
    }  # fmt: skip
    assert set(table(cfg, proxy("two"))) == set()  # root Sidecar: only istio-system's own
    cfg = config(tmp_path, "services: [{host: a.one.svc.cluster.local, namespace: one, "
                 "addresses: [10.0.1.1], exportTo: [.]}]\n")  # fmt: skip
    assert table(cfg, proxy("one")) and not table(cfg, proxy("three"))


def test_addresses_families_cidrs_merge_and_auto_allocation(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        """
namespace: ns
services:
  - {host: dual.ns.svc.cluster.local, addresses: [10.0.0.1, "fd00::1"]}
  - {host: v6only.ns.svc.cluster.local, addresses: ["fd00::2"]}
  - {host: cidr.example.com, registry: External, addresses: [10.8.0.0/16]}
  - {host: mixed.example.com, registry: External, addresses: [10.8.0.0/16, 10.7.0.1]}
  - {host: shared.example.com, registry: External, addresses: [10.6.0.1]}
  - {host: shared.example.com, namespace: other, registry: External, addresses: [10.6.0.2]}
  - {host: kube.ns.svc.cluster.local, registry: External, addresses: [10.5.0.1]}
  - {host: kube.ns.svc.cluster.local, namespace: ns2, name: kube, addresses: [10.5.0.2]}
  - {host: auto.example.com, registry: External, resolution: DNS}
  - {host: none.example.com, registry: External, resolution: NONE}
  - {host: "*.wild.example.com", registry: External, resolution: DNS}
""",
    )
    v4 = table(cfg, proxy("ns"))
    assert v4["dual.ns.svc.cluster.local"]["ips"] == ["10.0.0.1"]
    assert v4["v6only.ns.svc.cluster.local"]["ips"] == ["fd00::2"]
    assert "cidr.example.com" not in v4
    assert v4["mixed.example.com"]["ips"] == ["10.7.0.1"]
    assert v4["shared.example.com"]["ips"] == ["10.6.0.1", "10.6.0.2"]
    assert v4["kube.ns.svc.cluster.local"] == {
        "ips": ["10.5.0.2"], "registry": "Kubernetes", "shortname": "kube", "namespace": "ns2",
    }  # fmt: skip
    auto = v4["auto.example.com"]["ips"][0]
    assert auto.startswith("240.240.") and not auto.endswith((".0", ".255"))
    assert "none.example.com" not in v4 and "*.wild.example.com" not in v4
    assert "shortname" not in v4["auto.example.com"]
    dual = table(cfg, proxy("ns", ip="10.0.0.9", INSTANCE_IPS="x"))
    assert table(cfg, proxy("ns"))["auto.example.com"]["ips"] == [auto]  # deterministic
    no_capture = table(cfg, proxy("ns", DNS_CAPTURE="false"))
    assert "auto.example.com" not in no_capture
    assert "auto.example.com" not in table(cfg, proxy("ns", DNS_AUTO_ALLOCATE="false"))
    node6 = ProxyNode(
        "sidecar~fd00::9~p.ns~ns.svc.cluster.local",
        "sidecar",
        ("10.0.0.9", "fd00::9"),
        "p",
        "ns",
        "ns.svc.cluster.local",
        {},
    )
    assert table(cfg, node6)["dual.ns.svc.cluster.local"]["ips"] == ["10.0.0.1", "fd00::1"]
    assert dual  # a node with odd metadata still gets a table


def test_headless_endpoints_ready_network_and_registered_entries(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        """
namespace: db
services:
  - host: pg.db.svc.cluster.local
    addresses: [0.0.0.0]
    ports: [{port: 5432}]
    workloadSelector: {app: pg}
    endpoints:
      - {address: 10.1.0.1, hostname: pg-0, subdomain: pg}
      - {address: 10.1.0.1}
      - {address: 10.1.0.2, ready: false}
      - {address: 10.1.0.3, network: far}
  - {host: noports.db.svc.cluster.local, addresses: [0.0.0.0], endpoints: [{address: 10.1.0.9}]}
workloadGroups:
  - {name: pg, labels: {app: pg}}
  - {name: pg-checked, labels: {app: pg}, probe: {tcpSocket: {port: 5432}}}
""",
    )
    registry = Registry()
    registry.connect("s1", proxy("db", "10.2.0.1", AUTO_REGISTER_GROUP="pg"), cfg, 100.0)
    registry.connect("s2", proxy("db", "10.2.0.2", AUTO_REGISTER_GROUP="pg-checked"), cfg, 100.0)
    names = table(cfg, proxy("db", NETWORK="near"), registry)
    # pg-checked is health-checked and has not reported: not ready yet
    assert names["pg.db.svc.cluster.local"]["ips"] == ["10.1.0.1", "10.2.0.1"]
    assert names["pg-0.pg.db.svc.cluster.local"] == {
        "ips": ["10.1.0.1"], "registry": "Kubernetes", "shortname": "pg-0.pg", "namespace": "db",
    }  # fmt: skip
    assert "noports.db.svc.cluster.local" not in names
    registry.report_health("s2", True, "", 101.0)
    names = table(cfg, proxy("db", NETWORK="near"), registry)
    assert names["pg.db.svc.cluster.local"]["ips"] == ["10.1.0.1", "10.2.0.1", "10.2.0.2"]
    assert "10.1.0.3" in table(cfg, proxy("db", NETWORK="far"), registry)[
        "pg.db.svc.cluster.local"]["ips"]  # fmt: skip
    registry.report_health("s2", False, "refused", 102.0)
    names = table(cfg, proxy("db"), registry)
    assert "10.2.0.2" not in names["pg.db.svc.cluster.local"]["ips"]


# --- auto-registration ---


GROUPS = """
namespace: vm
workloadGroups:
  - name: web
    labels: {app: web, tier: group}
    annotations: {team: a}
    serviceAccount: web-sa
    template: {labels: {tier: template, version: v1}, ports: {http: 80}, network: tnet}
"""


def test_registration_names_labels_annotations(tmp_path: Path) -> None:
    cfg = config(tmp_path, GROUPS)
    registry = Registry(grace=10)
    node = proxy("vm", "fe80::1", AUTO_REGISTER_GROUP="web", NETWORK="n1",
                 LABELS={"tier": "node", "istio-locality": "r/z"},
                 PROXY_CONFIG={"readinessProbe": {"tcpSocket": {"port": 80}}})  # fmt: skip
    entry = registry.connect("s1", node, cfg, 1_700_000_000.25)
    assert entry is not None
    assert entry.name == "web-fe80--1-n1"
    assert entry.address == "fe80::1" and entry.network == "n1"
    assert entry.labels == {"app": "web", "tier": "node", "version": "v1"}
    assert entry.service_account == "web-sa" and entry.ports == {"http": 80}
    assert entry.annotations == {
        "istio.io/autoRegistrationGroup": "web",
        "team": "a",
        "proxy.istio.io/health-checks-enabled": "true",
        "istio.io/workloadController": "devmesh",
        "istio.io/connectedAt": "2023-11-14T22:13:20.25Z",
    }
    assert not entry.healthy  # health-checked, no report yet
    long = proxy("vm", "10.0.0.1", AUTO_REGISTER_GROUP="web" + "x" * 300)
    assert len(entry_name(long)) == 253 and entry_name(long).endswith("x-10.0.0.1")
    with pytest.raises(RegistrationError) as caught:
        registry.connect("s2", long, cfg, 1.0)
    assert caught.value.code == "FAILED_PRECONDITION"
    assert registry.connect("s3", proxy("vm"), cfg, 1.0) is None  # no group: no registration
    plain = registry.connect("s4", proxy("vm", "10.0.0.4", AUTO_REGISTER_GROUP="web"), cfg, 1.0)
    assert plain is not None and plain.healthy  # no probe anywhere: health not enforced
    assert plain.network == "tnet"


def test_disconnect_grace_reconnect_and_stream_counting(tmp_path: Path) -> None:
    cfg = config(tmp_path, GROUPS)
    registry = Registry(grace=10)
    node = proxy("vm", "10.0.0.5", AUTO_REGISTER_GROUP="web")
    registry.connect("a", node, cfg, 100.0)
    registry.connect("b", node, cfg, 101.0)  # a second stream from the same proxy
    assert registry.disconnect("a", 102.0) is None  # still connected through "b"
    assert registry.next_deadline() is None
    gone = registry.disconnect("b", 103.0)
    assert gone is not None and "istio.io/connectedAt" not in gone.annotations
    assert "istio.io/disconnectedAt" in gone.annotations
    assert registry.next_deadline() == 113.0
    assert registry.expire(112.9) == []
    back = registry.connect("c", node, cfg, 105.0)  # reconnect within the grace period
    assert back is not None and back.delete_at is None
    assert "istio.io/disconnectedAt" not in back.annotations
    assert registry.expire(200.0) == []
    registry.report_health("c", False, "down", 106.0)
    registry.report_health("c", False, "still down", 107.0)
    condition = registry.get("vm", "web-10.0.0.5").condition  # type: ignore[union-attr]
    assert condition is not None and condition.message == "still down"
    assert (condition.last_probe_time, condition.last_transition_time) == (107.0, 106.0)
    registry.disconnect("c", 110.0)
    assert [e.name for e in registry.expire(120.0)] == ["web-10.0.0.5"]
    assert registry.entries() == ()
    assert not registry.report_health("c", True, "", 121.0)


def test_group_removed_deletes_its_entries(tmp_path: Path) -> None:
    cfg = config(tmp_path, GROUPS)
    registry = Registry()
    registry.connect("a", proxy("vm", "10.0.0.5", AUTO_REGISTER_GROUP="web"), cfg, 1.0)
    assert [e.name for e in registry.prune(MeshConfig())] == ["web-10.0.0.5"]


def test_group_recreated_registers_connected_proxies_again(tmp_path: Path) -> None:
    """istio/istio#45329: a group deleted and created again while its VMs stay connected gets
    their entries back at once (not at their next reconnect), with their last health."""
    cfg = config(tmp_path, GROUPS)
    registry = Registry()
    sick = proxy("vm", "10.0.0.5", AUTO_REGISTER_GROUP="web")
    quiet = proxy("vm", "10.0.0.6", AUTO_REGISTER_GROUP="web")
    registry.connect("a", sick, cfg, 1.0)
    registry.connect("a2", sick, cfg, 1.5)  # a second stream of the same proxy
    registry.connect("b", quiet, cfg, 2.0)
    registry.connect("c", proxy("vm", "10.0.0.7", AUTO_REGISTER_GROUP="web"), cfg, 2.0)
    registry.disconnect("c", 3.0)  # gone: must not come back
    registry.report_health("a", True, "", 4.0)
    assert len(registry.prune(MeshConfig())) == 3
    assert registry.reregister(MeshConfig(), 5.0) == []  # group still absent
    # A report while the group is absent is kept with the stream.
    assert not registry.report_health("a", False, "HTTP 503", 6.0)
    back = registry.reregister(cfg, 7.0)
    assert [e.name for e in back] == ["web-10.0.0.5", "web-10.0.0.6"]
    assert [e.name for e in registry.entries()] == ["web-10.0.0.5", "web-10.0.0.6"]
    restored = registry.get("vm", "web-10.0.0.5")
    assert restored is not None and restored.labels["app"] == "web"
    assert restored.annotations["istio.io/connectedAt"] == "1970-01-01T00:00:01Z"
    assert restored.condition is not None and restored.condition.status is False
    assert (restored.condition.message, restored.condition.last_probe_time) == ("HTTP 503", 6.0)
    never_reported = registry.get("vm", "web-10.0.0.6")
    assert never_reported is not None and never_reported.condition is None
    assert registry.reregister(cfg, 8.0) == []  # idempotent
    # The restored entry is held by its streams: disconnect and grace work as before.
    registry.disconnect("a", 9.0)
    assert registry.disconnect("a2", 9.5) is not None
    assert registry.next_deadline() == 19.5


# --- node and session ---


def envoy_node(node_id: str, **meta: Any) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update(meta)
    return base_pb2.Node(id=node_id, metadata=metadata)


def test_parse_node_like_istiod() -> None:
    node = parse_node(envoy_node("sidecar~10.0.0.1~vm-1.vm~vm.svc.cluster.local",
                                 INSTANCE_IPS="10.0.0.1,fd00::1", LABELS={"app": "a"}))  # fmt: skip
    assert (node.ips, node.namespace, node.name) == (("10.0.0.1", "fd00::1"), "vm", "vm-1")
    assert node.labels == {"app": "a"}
    bad_ips = parse_node(
        envoy_node("sidecar~10.0.0.2~x.ns~ns.svc.cluster.local", INSTANCE_IPS="a,b")
    )
    assert bad_ips.ips == ("10.0.0.2",) and bad_ips.namespace == "ns"
    for broken in ("", "sidecar~10.0.0.1~x", "bogus~10.0.0.1~x.ns~ns.svc", "sidecar~nope~x.ns~ns"):
        with pytest.raises(NodeError):
            parse_node(envoy_node(broken) if broken else None)


def test_session_ack_nack_stale_and_health() -> None:
    session = Session("1", "peer", 0.0)
    request = discovery_pb2.DiscoveryRequest
    assert session.receive(request(type_url=NAME_TABLE), 1.0) == Respond(NAME_TABLE)
    sent = session.response(NAME_TABLE, [], 1.0, b"x")
    ack = request(type_url=NAME_TABLE, version_info=sent.version_info, response_nonce=sent.nonce)
    assert session.receive(ack, 2.0) == Ack(NAME_TABLE, sent.version_info)
    stale = request(type_url=NAME_TABLE, response_nonce="old")
    assert session.receive(stale, 2.0) == Stale(NAME_TABLE, "old")
    nack = request(type_url=NAME_TABLE, response_nonce=sent.nonce,
                   error_detail=status_pb2.Status(code=13, message="bad"))  # fmt: skip
    assert isinstance(session.receive(nack, 3.0), Nack)
    assert session.watches[NAME_TABLE].nacks[0].message == "bad"
    assert session.watches[NAME_TABLE].acked_version == sent.version_info
    # a nonce for a type never sent on this stream (reconnect to a new server): respond
    other = request(type_url="type.googleapis.com/x", response_nonce="from-before")
    assert session.receive(other, 4.0) == Respond("type.googleapis.com/x")
    unhealthy = request(type_url=HEALTH_INFO, error_detail=status_pb2.Status(code=13, message="m"))
    assert session.receive(unhealthy, 5.0) == Health(False, "m")
    assert session.receive(request(type_url=HEALTH_INFO), 6.0) == Health(True, "")
