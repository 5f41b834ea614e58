"""The xDS proxy's pure core: Envoy's ADS stream (downstream) on the agent's one upstream
stream; SotW and delta; Envoy restarts that istiod must not notice (reference §5.1)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
    Resource,
)
from google.protobuf import any_pb2

from vmagent.xds.proxycore import (
    AGENT_NONCE_PREFIX,
    DELTA,
    MAX_BUFFERED,
    SOTW,
    CloseDownstream,
    Decision,
    Note,
    ProxyCore,
    ReopenUpstream,
    ToDownstream,
    ToUpstream,
)
from vmagent.xds.session import HEALTH_TYPE, NAME_TABLE_TYPE

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ODD = "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig"


def ups(decisions: list[Decision]) -> list[Any]:
    return [d.request for d in decisions if isinstance(d, ToUpstream)]


def downs(decisions: list[Decision]) -> list[Any]:
    return [d.response for d in decisions if isinstance(d, ToDownstream)]


def closes(decisions: list[Decision]) -> list[CloseDownstream]:
    return [d for d in decisions if isinstance(d, CloseDownstream)]


def node() -> base_pb2.Node:
    return base_pb2.Node(id="sidecar~10.0.0.5~vm-1.ns~ns.svc.cluster.local")


def sotw_core() -> ProxyCore:
    core = ProxyCore(SOTW)
    assert core.upstream_opened(SOTW) == []
    return core


def cluster(name: str) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(cluster_pb2.Cluster(name=name))
    return packed


def sotw_push(type_url: str, version: str, nonce: str) -> DiscoveryResponse:
    return DiscoveryResponse(type_url=type_url, version_info=version, nonce=nonce)


def delta_push(
    type_url: str, nonce: str, names: dict[str, str], removed: tuple[str, ...] = ()
) -> DeltaDiscoveryResponse:
    return DeltaDiscoveryResponse(
        type_url=type_url,
        nonce=nonce,
        system_version_info=f"sys-{nonce}",
        resources=[
            Resource(name=name, version=version, resource=cluster(name))
            for name, version in names.items()
        ],
        removed_resources=list(removed),
    )


def kept(response: Any) -> dict[str, str]:
    return {r.name: r.version for r in response.resources}


# -- state of the world -----------------------------------------------------------------


def test_sotw_requests_go_up_without_node_and_answers_come_back() -> None:
    core = sotw_core()
    core.downstream_opened(1, SOTW)
    first = DiscoveryRequest(type_url=CDS, node=node())
    (sent,) = ups(core.downstream_request(1, first))
    assert sent.type_url == CDS and not sent.HasField("node")  # the agent's opening had it
    push = sotw_push(CDS, "v1", "n1")
    assert downs(core.upstream_response(push)) == [push]
    ack = DiscoveryRequest(type_url=CDS, version_info="v1", response_nonce="n1")
    assert ups(core.downstream_request(1, ack)) == [ack]


def test_sotw_agent_ack_keeps_the_resource_names_of_named_types() -> None:
    """istiod's shouldUnsubscribe: an EDS request with no names drops the watch."""
    core = sotw_core()
    core.downstream_opened(1, SOTW)
    core.downstream_request(1, DiscoveryRequest(type_url=EDS, resource_names=["a", "b"]))
    core.downstream_closed(1)
    decisions = core.upstream_response(sotw_push(EDS, "v2", "n2"))
    assert downs(decisions) == []
    (ack,) = ups(decisions)
    assert list(ack.resource_names) == ["a", "b"]
    assert (ack.version_info, ack.response_nonce) == ("v2", "n2")


def test_sotw_envoy_gone_unanswered_responses_are_acked_by_the_agent() -> None:
    core = sotw_core()
    core.downstream_opened(1, SOTW)
    core.downstream_request(1, DiscoveryRequest(type_url=LDS))
    core.downstream_request(1, DiscoveryRequest(type_url=CDS))
    core.upstream_response(sotw_push(LDS, "v1", "l1"))
    core.upstream_response(sotw_push(CDS, "v1", "c1"))
    core.downstream_request(
        1, DiscoveryRequest(type_url=LDS, version_info="v1", response_nonce="l1")
    )
    acks = ups(core.downstream_closed(1))  # Envoy killed before it ACKed CDS
    assert [(a.type_url, a.response_nonce, a.version_info) for a in acks] == [(CDS, "c1", "v1")]
    assert ups(core.downstream_closed(1)) == []  # once


def test_sotw_restarted_envoy_requests_are_forwarded_for_a_full_answer() -> None:
    """Empty nonce = INIT for istiod even on a watched type: forward, istiod answers."""
    core = sotw_core()
    core.downstream_opened(1, SOTW)
    core.downstream_request(1, DiscoveryRequest(type_url=LDS))
    core.upstream_response(sotw_push(LDS, "v1", "l1"))
    core.downstream_closed(1)
    core.downstream_opened(2, SOTW)
    again = DiscoveryRequest(type_url=LDS, node=node())
    (sent,) = ups(core.downstream_request(2, again))
    assert sent.type_url == LDS and not sent.response_nonce
    assert downs(core.upstream_response(sotw_push(LDS, "v2", "l2")))[0].nonce == "l2"
    assert downs(core.downstream_request(2, again)) == []  # never answered by the agent


def test_sotw_types_envoy_has_not_asked_for_are_acked_by_the_agent() -> None:
    core = sotw_core()
    core.downstream_opened(1, SOTW)
    core.downstream_request(1, DiscoveryRequest(type_url=CDS))
    decisions = core.upstream_response(sotw_push(LDS, "v1", "l1"))
    assert downs(decisions) == [] and ups(decisions)[0].response_nonce == "l1"
    odd = core.upstream_response(sotw_push(ODD, "v1", "p1"))  # not an Envoy type: dropped
    assert downs(odd) == [] and ups(odd)[0].response_nonce == "p1"


def test_sotw_nack_from_envoy_goes_up_verbatim() -> None:
    core = sotw_core()
    core.downstream_opened(1, SOTW)
    core.downstream_request(1, DiscoveryRequest(type_url=CDS))
    core.upstream_response(sotw_push(CDS, "v1", "c1"))
    nack = DiscoveryRequest(type_url=CDS, response_nonce="c1")
    nack.error_detail.code, nack.error_detail.message = 13, "bad cluster"
    assert ups(core.downstream_request(1, nack)) == [nack]


def test_envoy_never_sends_the_agents_own_types_upstream() -> None:
    core = sotw_core()
    core.downstream_opened(1, SOTW)
    for type_url in (NAME_TABLE_TYPE, HEALTH_TYPE):
        assert ups(core.downstream_request(1, DiscoveryRequest(type_url=type_url))) == []


# -- delta ------------------------------------------------------------------------------


def delta_core() -> ProxyCore:
    core = ProxyCore(DELTA)
    core.upstream_opened(DELTA)
    return core


def envoy_delta(core: ProxyCore, stream: int) -> None:
    """A fresh Envoy: wildcard CDS and LDS, then EDS for two clusters."""
    assert core.downstream_opened(stream, DELTA) == []


def test_delta_first_requests_of_new_types_go_up_verbatim() -> None:
    core = delta_core()
    envoy_delta(core, 1)
    request = DeltaDiscoveryRequest(type_url=CDS, node=node(), initial_resource_versions={"a": "1"})
    (sent,) = ups(core.downstream_request(1, request))
    assert not sent.HasField("node") and dict(sent.initial_resource_versions) == {"a": "1"}
    push = delta_push(CDS, "c1", {"a": "2", "b": "1"})
    assert downs(core.upstream_response(push)) == [push]


def run_first_envoy(core: ProxyCore) -> None:
    envoy_delta(core, 1)
    core.downstream_request(1, DeltaDiscoveryRequest(type_url=CDS, node=node()))
    core.downstream_request(1, DeltaDiscoveryRequest(type_url=LDS))
    core.upstream_response(delta_push(CDS, "c1", {"a": "1", "b": "1"}))
    core.downstream_request(1, DeltaDiscoveryRequest(type_url=CDS, response_nonce="c1"))
    core.upstream_response(delta_push(LDS, "l1", {"in": "1"}))
    core.downstream_request(1, DeltaDiscoveryRequest(type_url=LDS, response_nonce="l1"))
    core.downstream_request(
        1, DeltaDiscoveryRequest(type_url=EDS, resource_names_subscribe=["a", "b"])
    )
    core.upstream_response(delta_push(EDS, "e1", {"a": "1", "b": "1"}))
    core.downstream_request(1, DeltaDiscoveryRequest(type_url=EDS, response_nonce="e1"))


def test_delta_restarted_envoy_is_answered_from_kept_state_not_upstream() -> None:
    """istiod sends nothing to a re-request with unchanged names: the agent answers."""
    core = delta_core()
    run_first_envoy(core)
    assert ups(core.downstream_closed(1)) == []  # all answered: nothing to ACK
    core.downstream_opened(2, DELTA)
    decisions = core.downstream_request(2, DeltaDiscoveryRequest(type_url=CDS, node=node()))
    assert ups(decisions) == []  # istiod is not asked again
    (replay,) = downs(decisions)
    assert kept(replay) == {"a": "1", "b": "1"} and replay.nonce.startswith(AGENT_NONCE_PREFIX)
    assert replay.system_version_info == "sys-c1"
    # Envoy's ACK of the agent's nonce is the agent's own business.
    assert (
        core.downstream_request(2, DeltaDiscoveryRequest(type_url=CDS, response_nonce=replay.nonce))
        == []
    )
    eds = core.downstream_request(
        2, DeltaDiscoveryRequest(type_url=EDS, resource_names_subscribe=["b", "a"])
    )
    assert ups(eds) == [] and kept(downs(eds)[0]) == {"a": "1", "b": "1"}
    assert core.stats.replays == 2


def test_delta_pushes_while_envoy_is_away_are_acked_and_kept() -> None:
    core = delta_core()
    run_first_envoy(core)
    core.downstream_closed(1)
    decisions = core.upstream_response(delta_push(CDS, "c2", {"c": "1"}, removed=("a",)))
    (ack,) = ups(decisions)
    assert (ack.type_url, ack.response_nonce) == (CDS, "c2") and not ack.HasField("error_detail")
    assert downs(decisions) == []
    core.downstream_opened(2, DELTA)
    (replay,) = downs(core.downstream_request(2, DeltaDiscoveryRequest(type_url=CDS)))
    assert kept(replay) == {"b": "1", "c": "1"}  # "a" was removed meanwhile
    assert replay.system_version_info == "sys-c2"


def test_delta_replay_sends_only_changed_versions_and_removals_envoy_holds() -> None:
    """A reconnecting Envoy lists what it holds: unchanged versions are not resent, names
    istiod removed come back as removed_resources."""
    core = delta_core()
    run_first_envoy(core)
    core.downstream_closed(1)
    core.upstream_response(delta_push(CDS, "c2", {"b": "2"}, removed=("a",)))
    core.downstream_opened(2, DELTA)
    request = DeltaDiscoveryRequest(type_url=CDS, initial_resource_versions={"a": "1", "b": "1"})
    (replay,) = downs(core.downstream_request(2, request))
    assert kept(replay) == {"b": "2"} and list(replay.removed_resources) == ["a"]
    assert ups(core.downstream_request(2, request)) != []  # a 2nd request is not "first"


def test_delta_subscription_changes_on_reconnect_go_up_as_spontaneous_requests() -> None:
    core = delta_core()
    run_first_envoy(core)
    core.downstream_closed(1)
    core.downstream_opened(2, DELTA)
    decisions = core.downstream_request(
        2, DeltaDiscoveryRequest(type_url=EDS, resource_names_subscribe=["b", "c"])
    )
    (change,) = ups(decisions)
    assert list(change.resource_names_subscribe) == ["c"]
    assert list(change.resource_names_unsubscribe) == ["a"]
    assert change.response_nonce == ""  # istiod drops changes riding on a nonce it did not send
    assert kept(downs(decisions)[0]) == {"b": "1"}  # "c" comes from istiod, "a" is not wanted
    push = delta_push(EDS, "e2", {"c": "1"})
    assert downs(core.upstream_response(push)) == [push]


def test_delta_ack_of_a_replay_with_a_subscription_change_forwards_the_change() -> None:
    core = delta_core()
    run_first_envoy(core)
    core.downstream_opened(2, DELTA)
    (replay,) = downs(
        core.downstream_request(
            2, DeltaDiscoveryRequest(type_url=EDS, resource_names_subscribe=["a", "b"])
        )
    )
    ack = DeltaDiscoveryRequest(
        type_url=EDS, response_nonce=replay.nonce, resource_names_unsubscribe=["b"]
    )
    (change,) = ups(core.downstream_request(2, ack))
    assert list(change.resource_names_unsubscribe) == ["b"] and change.response_nonce == ""
    core.downstream_opened(3, DELTA)  # what a later Envoy gets no longer has "b"
    (again,) = downs(
        core.downstream_request(
            3, DeltaDiscoveryRequest(type_url=EDS, resource_names_subscribe=["a"])
        )
    )
    assert kept(again) == {"a": "1"}


def test_delta_nack_of_a_replay_is_swallowed_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    core = delta_core()
    run_first_envoy(core)
    core.downstream_opened(2, DELTA)
    (replay,) = downs(core.downstream_request(2, DeltaDiscoveryRequest(type_url=LDS)))
    nack = DeltaDiscoveryRequest(type_url=LDS, response_nonce=replay.nonce)
    nack.error_detail.code, nack.error_detail.message = 13, "listener in use"
    decisions = core.downstream_request(2, nack)
    assert ups(decisions) == []
    (note,) = [d for d in decisions if isinstance(d, Note)]
    assert note.level == logging.ERROR and "listener in use" in note.text
    assert core.snapshot()["replay_nacks"] == 1
    assert core.snapshot()["last_replay_nack"] == "listener in use"


def test_delta_change_on_a_stale_upstream_nonce_is_sent_without_the_nonce() -> None:
    core = delta_core()
    run_first_envoy(core)
    core.upstream_response(delta_push(EDS, "e2", {"a": "2"}))  # in flight to Envoy
    stale = DeltaDiscoveryRequest(type_url=EDS, response_nonce="e1", resource_names_subscribe=["c"])
    (sent,) = ups(core.downstream_request(1, stale))
    assert sent.response_nonce == "" and list(sent.resource_names_subscribe) == ["c"]
    current = DeltaDiscoveryRequest(type_url=EDS, response_nonce="e2")
    assert ups(core.downstream_request(1, current)) == [current]


def test_delta_unanswered_pushes_are_acked_when_envoy_goes() -> None:
    core = delta_core()
    run_first_envoy(core)
    core.upstream_response(delta_push(LDS, "l2", {"in": "2"}))
    (ack,) = ups(core.downstream_closed(1))
    assert (ack.type_url, ack.response_nonce) == (LDS, "l2")


def test_delta_empty_kept_state_still_answers_so_envoy_finishes_init() -> None:
    core = delta_core()
    envoy_delta(core, 1)
    core.downstream_request(1, DeltaDiscoveryRequest(type_url=LDS))
    core.upstream_response(delta_push(LDS, "l1", {}))
    core.downstream_closed(1)
    core.downstream_opened(2, DELTA)
    (replay,) = downs(core.downstream_request(2, DeltaDiscoveryRequest(type_url=LDS)))
    assert list(replay.resources) == [] and replay.nonce.startswith(AGENT_NONCE_PREFIX)


# -- lifecycle --------------------------------------------------------------------------


def test_upstream_loss_closes_envoys_stream_and_new_upstream_starts_clean() -> None:
    core = delta_core()
    run_first_envoy(core)
    (close,) = closes(core.upstream_closed())
    assert close.stream == 1 and "control-plane" in close.reason
    assert core.upstream_opened(DELTA) == []
    core.downstream_opened(2, DELTA)
    request = DeltaDiscoveryRequest(type_url=CDS, initial_resource_versions={"a": "1"})
    assert ups(core.downstream_request(2, request)) == [request]  # istiod answers now
    assert core.snapshot()["kept_resources"] == 0


def test_requests_wait_for_the_upstream_stream_then_go_in_order() -> None:
    core = ProxyCore(DELTA)  # the upstream is still connecting
    core.downstream_opened(1, DELTA)
    first = DeltaDiscoveryRequest(type_url=CDS, node=node())
    second = DeltaDiscoveryRequest(type_url=LDS)
    assert core.downstream_request(1, first) == [] and core.downstream_request(1, second) == []
    sent = ups(core.upstream_opened(DELTA))
    assert [r.type_url for r in sent] == [CDS, LDS]


def test_waiting_requests_are_bounded() -> None:
    core = ProxyCore(SOTW)
    core.downstream_opened(1, SOTW)
    for _ in range(MAX_BUFFERED):
        assert core.downstream_request(1, DiscoveryRequest(type_url=CDS)) == []
    (close,) = closes(core.downstream_request(1, DiscoveryRequest(type_url=CDS)))
    assert close.stream == 1 and core.down is None


def test_envoy_of_the_other_kind_reopens_the_upstream_in_its_kind() -> None:
    core = delta_core()
    decisions = core.downstream_opened(1, SOTW)
    (reopen,) = [d for d in decisions if isinstance(d, ReopenUpstream)]
    assert reopen.kind == SOTW and core.snapshot()["upstream_reopens"] == 1
    assert any(isinstance(d, Note) and d.level == logging.WARNING for d in decisions)
    assert core.downstream_request(1, DiscoveryRequest(type_url=CDS)) == []  # waits
    assert closes(core.upstream_closed()) == []  # not bound to the old stream: kept
    (sent,) = ups(core.upstream_opened(SOTW))
    assert sent.type_url == CDS


def test_a_second_envoy_stream_replaces_the_first() -> None:
    core = sotw_core()
    core.downstream_opened(1, SOTW)
    core.downstream_request(1, DiscoveryRequest(type_url=CDS))
    (close,) = closes(core.downstream_opened(2, SOTW))
    assert close.stream == 1
    assert core.downstream_request(1, DiscoveryRequest(type_url=LDS)) == []  # old: ignored
    assert len(ups(core.downstream_request(2, DiscoveryRequest(type_url=LDS)))) == 1
    assert core.downstream_closed(1) == []


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="sotw"):
        ProxyCore("grpc")


def test_delta_wildcard_names_envoy_held_are_never_unsubscribed_later() -> None:
    """After an upstream reconnect Envoy lists the clusters it holds; a later fresh Envoy
    (none held) must not turn that into unsubscribes of a wildcard watch."""
    core = delta_core()
    envoy_delta(core, 1)
    held = DeltaDiscoveryRequest(type_url=CDS, initial_resource_versions={"a": "1", "b": "1"})
    assert ups(core.downstream_request(1, held)) == [held]
    core.upstream_response(delta_push(CDS, "c1", {"a": "1", "b": "2"}))
    core.downstream_closed(1)
    core.downstream_opened(2, DELTA)
    decisions = core.downstream_request(2, DeltaDiscoveryRequest(type_url=CDS))
    assert ups(decisions) == [] and kept(downs(decisions)[0]) == {"a": "1", "b": "2"}


def test_delta_named_types_count_held_names_as_subscribed() -> None:
    """For EDS, names Envoy holds are names it watches (istiod's deltaWatchedResources)."""
    core = delta_core()
    run_first_envoy(core)
    core.downstream_opened(2, DELTA)
    request = DeltaDiscoveryRequest(
        type_url=EDS, resource_names_subscribe=["a"], initial_resource_versions={"b": "1"}
    )
    decisions = core.downstream_request(2, request)
    assert ups(decisions) == []  # {"a", "b"}: what istiod already watches
    assert kept(downs(decisions)[0]) == {"a": "1"}  # "b" is held at the same version
