"""``vmagent devmesh serve`` and ``devmesh ca`` as processes stop on Ctrl-C with clients still
connected (an ADS stream, an idle TLS connection, an idle debug connection) without tracebacks
or "Event loop is closed"; a port in use is one clear line naming it and its flag."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from loopback import free_port

from .devmesh_xds_helpers import NAME_TABLE, SERVER_NAME, node
from .test_devmesh_serve_command import EXAMPLES, _env

pytestmark = pytest.mark.timeout(90)
NOISE = ("Traceback", "Event loop is closed", "was never awaited", "Exception ignored")
# The whole first line (a read may catch it half written).
LISTENING = re.compile(
    r"^(?:devmesh|dev CA) listening on ([^\s;]+)[^\n]*?(?:debug: (http://\S+))?\n", re.MULTILINE
)


def _start(argv: list[str], tmp_path: Path, log: Path) -> tuple[subprocess.Popen[str], str, str]:
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "vmagent", *argv],
            env={**_env(tmp_path), "PYTHONUNBUFFERED": "1"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.monotonic() + 30
    while not (found := LISTENING.search(log.read_text())):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return process, found.group(1), found.group(2) or ""


def _stop(process: subprocess.Popen[str], log: Path) -> str:
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise AssertionError(f"did not stop on SIGINT:\n{log.read_text()}") from None
    output = log.read_text()
    assert code == 0, output
    assert not [noise for noise in NOISE if noise in output], output
    return output


def _idle_tls(address: str) -> ssl.SSLSocket:
    """A TLS connection to the CA port that says nothing after the handshake."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return context.wrap_socket(socket.create_connection((host, int(port)), timeout=5))


def _idle_http(url: str) -> socket.socket:
    host, _, port = url.removeprefix("http://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"GET /debug/registry HTTP/1.1\r\n")  # and never the end of the headers
    return sock


def test_serve_stops_on_ctrl_c_with_clients_connected(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    argv = ["devmesh", "serve", "--config", str(EXAMPLES), "--listen", f"127.0.0.1:{free_port()}",
            "--debug-listen", f"127.0.0.1:{free_port()}"]  # fmt: skip
    process, address, debug_url = _start(argv, tmp_path, log)
    try:
        root = (tmp_path / "state" / "devmesh" / "root-cert.pem").read_bytes()
        tls, http = _idle_tls(address), _idle_http(debug_url)

        async def scenario() -> str:
            async with grpc.aio.secure_channel(
                address,
                grpc.ssl_channel_credentials(root),
                options=[("grpc.ssl_target_name_override", SERVER_NAME)],
            ) as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                call = stub.StreamAggregatedResources()
                request = discovery_pb2.DiscoveryRequest(
                    type_url=NAME_TABLE, node=node("10.0.0.9", "vm-1", "vm")
                )
                await call.write(request)
                assert (await asyncio.wait_for(call.read(), 10)).resources
                # The stream is open: Ctrl-C the server now. It ends the stream itself.
                process.send_signal(signal.SIGINT)
                ending = await asyncio.wait_for(call.read(), 10)
                assert ending is grpc.aio.EOF  # type: ignore[attr-defined]
                return str((await call.code()).name)

        try:
            code = asyncio.run(scenario())
        finally:
            tls.close()
            http.close()
        assert code in ("OK", "UNAVAILABLE", "CANCELLED"), code
        output = _stop(process, log)
        assert "listening on" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_ca_stops_on_ctrl_c_with_an_idle_connection(tmp_path: Path) -> None:
    log = tmp_path / "ca.log"
    argv = ["devmesh", "ca", "--listen", f"127.0.0.1:{free_port()}"]
    process, address, _ = _start(argv, tmp_path, log)
    tls = _idle_tls(address)
    try:
        time.sleep(0.2)
        _stop(process, log)
    finally:
        tls.close()
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize(
    ("argv", "which", "flag"),
    [
        (["devmesh", "serve", "--config", str(EXAMPLES)], "--listen", "--listen"),
        (["devmesh", "serve", "--config", str(EXAMPLES)], "--debug-listen", "--debug-listen"),
        (["devmesh", "ca"], "--listen", "--listen"),
    ],
    ids=["serve-listen", "serve-debug", "ca-listen"],
)
def test_port_in_use_is_one_line(tmp_path: Path, argv: list[str], which: str, flag: str) -> None:
    ports = {"--listen": free_port(), "--debug-listen": free_port()}
    for option, port in ports.items():
        if option == "--listen" or argv[1] == "serve":
            argv = [*argv, option, f"127.0.0.1:{port}"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[which]))
        busy.listen()
        result = subprocess.run(
            [sys.executable, "-m", "vmagent", *argv],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=40,
        )
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{ports[which]}" in lines[0] and flag in lines[0], lines[0]
    assert "already in use" in lines[0]
