"""HTTP probes against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from health_helpers import (
    Events,
    app_server,
    free_port,
    run,
    running,
    self_signed_context,
    spec,
)

from vmagent.health import HealthChecker, ProbeResult, run_probe


def http(port: int, **fields: object) -> dict[str, object]:
    return {"httpGet": {"port": port, **fields}}


def test_probe_comes_from_127_0_0_6_with_istio_user_agent() -> None:
    with app_server() as app:
        # default host: localhost
        assert run(run_probe(spec(http(app.port, path="/ready?x=1")))) == ProbeResult.ok()
        (seen,) = app.seen
    assert seen.client[0] == "127.0.0.6"
    assert seen.path == "/ready?x=1"
    assert seen.headers["user-agent"] == "istio-probe/1.0"
    assert seen.headers["host"] == f"localhost:{app.port}"
    assert seen.headers["connection"] == "close"


def test_custom_headers_are_sent_and_host_header_sets_the_request_host() -> None:
    headers = [
        {"name": "Host", "value": "app.example.com"},
        {"name": "X-Token", "value": "abc"},
        {"name": "X-Multi", "value": "1"},
        {"name": "X-Multi", "value": "2"},
    ]
    with app_server() as app:
        assert run(run_probe(spec(http(app.port, httpHeaders=headers)))).healthy
        (seen,) = app.seen
    assert seen.headers["host"] == "app.example.com"
    assert seen.headers["x-token"] == "abc"
    assert [v for k, v in seen.header_lines if k == "X-Multi"] == ["1", "2"]
    assert [k.lower() for k, _ in seen.header_lines].count("host") == 1


def test_custom_user_agent_replaces_the_default() -> None:
    headers = [{"name": "User-Agent", "value": "my-probe"}]
    with app_server() as app:
        assert run(run_probe(spec(http(app.port, httpHeaders=headers)))).healthy
        (seen,) = app.seen
    assert [v for k, v in seen.header_lines if k.lower() == "user-agent"] == ["my-probe"]


@pytest.mark.parametrize(
    ("status", "healthy"),
    [(200, True), (204, True), (302, True), (399, True), (400, False), (404, False), (503, False)],
)
def test_healthy_iff_status_in_200_to_399(status: int, healthy: bool) -> None:
    with app_server() as app:
        app.status = status
        result = run(run_probe(spec(http(app.port))))
    assert result.healthy is healthy
    if not healthy:
        assert result.message == f"status code was not from [200,400), bad code {status}"


def test_every_probe_uses_a_fresh_connection() -> None:
    async def twice() -> None:
        probe = spec(http(app.port))
        for _ in range(3):
            assert (await run_probe(probe)).healthy

    with app_server() as app:
        run(twice())
        ports = {seen.client[1] for seen in app.seen}
    assert len(ports) == 3


def test_connection_refused_names_url_and_address() -> None:
    port = free_port()
    result = run(run_probe(spec(http(port, host="127.0.0.1"))))
    assert not result.healthy
    assert result.message.startswith(f'Get "http://127.0.0.1:{port}/": dial tcp 127.0.0.1:{port}')
    assert "connection refused" in result.message


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run(run_probe(spec(http(port, host="127.0.0.1"), timeout_seconds=0.3)))
    assert not result.healthy
    assert result.message == f'Get "http://127.0.0.1:{port}/": timed out after 0.3s'


def test_garbage_response_is_unhealthy() -> None:
    async def scenario() -> ProbeResult:
        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-OpenSSH\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(reply, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await run_probe(spec(http(port, host="127.0.0.1")))

    result = run(scenario())
    assert not result.healthy
    assert "malformed HTTP response" in result.message


def test_https_is_probed_without_verifying_the_certificate(tmp_path: Path) -> None:
    with app_server(tls=self_signed_context(tmp_path)) as app:
        result = run(run_probe(spec(http(app.port, scheme="HTTPS"))))
        assert result == ProbeResult.ok()
        (seen,) = app.seen
    assert seen.client[0] == "127.0.0.6"
    assert seen.headers["user-agent"] == "istio-probe/1.0"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_target_falls_back_when_the_mesh_source_cannot_be_bound() -> None:
    with app_server(host="::1") as app:
        result = run(run_probe(spec(http(app.port, host="::1"))))
        assert result.healthy, result.message
        (seen,) = app.seen
    # ::6 is not a local address unless configured; the probe still goes out
    assert seen.client[0] in ("::1", "::6")
    assert seen.headers["host"] == f"[::1]:{app.port}"


def test_checker_follows_the_app_200_503_200() -> None:
    async def scenario() -> None:
        events = Events()
        checker = HealthChecker(spec(http(app.port), period_seconds=0.05), events)
        async with running(checker):
            assert (await events.next()).healthy
            app.status = 503
            down = await events.next()
            assert not down.healthy
            assert down.message == "status code was not from [200,400), bad code 503"
            assert checker.status().as_dict()["state"] == "unhealthy"
            app.status = 200
            assert (await events.next()).healthy
        assert [e.healthy for e in events.all] == [True, False, True]
        assert all(seen.client[0] == "127.0.0.6" for seen in app.seen)

    with app_server() as app:
        run(scenario())
