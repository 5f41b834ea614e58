"""``vmagent devmesh serve --no-capture`` as a process: a delta ADS client gets listeners for
proxies without iptables (outbound HTTP port listeners bound on 127.0.0.1, mesh endpoints on
15006); without the flag, Istio's captured shape (port listeners not bound)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import grpc.aio
import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from .devmesh_delta_helpers import LDS
from .devmesh_xds_helpers import SERVER_NAME, node
from .test_devmesh_serve_command import EXAMPLES, _command, _env

pytestmark = pytest.mark.timeout(60)


def listeners_from_serve(tmp_path: Path, *flags: str) -> dict[str, listener_pb2.Listener]:
    config = tmp_path / "mesh"
    shutil.copytree(EXAMPLES, config)
    process = subprocess.Popen(
        [*_command(config), *flags], env=_env(tmp_path), stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        address = re.search(r"listening on (\S+) \(CA \+ xDS", process.stdout.readline())
        assert address
        root = (tmp_path / "state" / "devmesh" / "root-cert.pem").read_bytes()

        async def scenario() -> dict[str, listener_pb2.Listener]:
            async with grpc.aio.secure_channel(
                address.group(1),
                grpc.ssl_channel_credentials(root),
                options=[("grpc.ssl_target_name_override", SERVER_NAME)],
            ) as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                call = stub.DeltaAggregatedResources()
                request = discovery_pb2.DeltaDiscoveryRequest(
                    type_url=LDS, node=node("10.0.0.9", "client-0", "vm")
                )
                await call.write(request)
                response = await asyncio.wait_for(call.read(), 10)
                call.cancel()
                out = {}
                for resource in response.resources:
                    listener = listener_pb2.Listener()
                    assert resource.resource.Unpack(listener)
                    out[listener.name] = listener
                return out

        return asyncio.run(scenario())
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_serve_no_capture_binds_outbound_http_ports(tmp_path: Path) -> None:
    listeners = listeners_from_serve(tmp_path, "--no-capture")
    port = listeners["0.0.0.0_9080"]  # bookinfo's HTTP port
    assert port.bind_to_port.value
    assert port.address.socket_address.address == "127.0.0.1"
    assert port.address.socket_address.port_value == 9080
    assert listeners["virtualInbound"].address.socket_address.port_value == 15006


def test_serve_default_is_the_captured_shape(tmp_path: Path) -> None:
    listeners = listeners_from_serve(tmp_path)
    assert not listeners["0.0.0.0_9080"].bind_to_port.value
    assert listeners["virtualOutbound"].use_original_dst.value
