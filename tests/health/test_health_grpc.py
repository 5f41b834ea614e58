"""gRPC probes against a real grpc.aio server running grpc.health.v1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from health_helpers import Events, free_port, run, running, spec

from vmagent.health import HealthChecker, ProbeResult, ProbeSpec, run_probe

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@asynccontextmanager
async def health_server(port: int = 0) -> AsyncIterator[tuple[int, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(None)


def grpc_probe(port: int, service: str = "", period_seconds: float | None = None) -> ProbeSpec:
    return spec({"grpc": {"port": port, "service": service}}, period_seconds=period_seconds)


def test_serving_is_healthy_not_serving_is_not() -> None:
    async def scenario() -> list[ProbeResult]:
        async with health_server() as (port, servicer):
            await servicer.set("", SERVING)
            await servicer.set("shop.Cart", NOT_SERVING)
            return [
                await run_probe(grpc_probe(port)),
                await run_probe(grpc_probe(port, "shop.Cart")),
                await run_probe(grpc_probe(port, "shop.Unknown")),
            ]

    serving, not_serving, unknown = run(scenario())
    assert serving == ProbeResult.ok()
    assert not_serving == ProbeResult(False, 'service unhealthy (responded with "NOT_SERVING")')
    assert not unknown.healthy
    assert "code = NOT_FOUND" in unknown.message


def test_no_server_is_unhealthy_unavailable() -> None:
    port = free_port()
    result = run(run_probe(grpc_probe(port)))
    assert not result.healthy
    assert result.message.startswith(f"gRPC health check localhost:{port}: rpc error:")
    assert "UNAVAILABLE" in result.message


def test_checker_follows_serving_not_serving_serving() -> None:
    async def scenario() -> None:
        async with health_server() as (port, servicer):
            await servicer.set("", SERVING)
            events = Events()
            probe = grpc_probe(port, period_seconds=0.05)
            async with running(HealthChecker(probe, events)) as task:
                assert (await events.next()).healthy
                await servicer.set("", NOT_SERVING)
                down = await events.next()
                assert down == type(down)(False, 'service unhealthy (responded with "NOT_SERVING")')
                await servicer.set("", SERVING)
                assert (await events.next()).healthy
            assert task.cancelled()

    run(scenario())
