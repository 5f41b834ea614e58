"""``vmagent devmesh serve --config DIR`` as a process: CA and ADS on one TLS port, the debug
server, and a clear error for a bad config directory."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import grpc.aio
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from vmagent._proto import ca_pb2_grpc, nds_pb2

from .devmesh_xds_helpers import NAME_TABLE, SERVER_NAME, node

pytestmark = pytest.mark.timeout(60)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "devmesh"


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "cluster.env").write_text("")
    return {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "VMAGENT_CLUSTER_ENV": str(tmp_path / "cluster.env"),
        "VMAGENT_STATE_DIR": str(tmp_path / "state"),
    }


def _command(config: Path) -> list[str]:
    return [
        sys.executable, "-m", "vmagent", "devmesh", "serve", "--config", str(config),
        "--listen", "127.0.0.1:0", "--debug-listen", "127.0.0.1:0",
    ]  # fmt: skip


def test_serve_answers_nds_over_tls_next_to_the_ca(tmp_path: Path) -> None:
    config = tmp_path / "mesh"
    shutil.copytree(EXAMPLES, config)
    process = subprocess.Popen(
        _command(config), env=_env(tmp_path), stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        address = re.search(r"listening on (\S+) \(CA \+ xDS", line)
        debug_url = re.search(r"debug: (http://\S+)", line)
        assert address and debug_url, line
        root = (tmp_path / "state" / "devmesh" / "root-cert.pem").read_bytes()

        async def scenario() -> dict[str, list[str]]:
            async with grpc.aio.secure_channel(
                address.group(1),
                grpc.ssl_channel_credentials(root),
                options=[("grpc.ssl_target_name_override", SERVER_NAME)],
            ) as channel:
                # The CA service is on the same port.
                assert ca_pb2_grpc.IstioCertificateServiceStub(channel) is not None
                call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
                    channel
                ).StreamAggregatedResources()
                await call.write(
                    discovery_pb2.DiscoveryRequest(
                        type_url=NAME_TABLE, node=node("10.0.0.9", "vm-1", "vm")
                    )
                )
                response = await asyncio.wait_for(call.read(), 10)
                table = nds_pb2.NameTable()
                assert response.resources[0].Unpack(table)
                call.cancel()
                return {host: list(info.ips) for host, info in table.table.items()}

        table = asyncio.run(scenario())
        assert table["productpage.bookinfo.svc.cluster.local"] == ["10.96.0.20"]
        assert table["*.partner.example.com"] == ["10.200.0.10"]
        with urllib.request.urlopen(debug_url.group(1) + "/debug/config", timeout=5) as reply:
            assert len(json.loads(reply.read())["services"]) == 10
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_serve_rejects_a_bad_config_directory(tmp_path: Path) -> None:
    config = tmp_path / "mesh"
    config.mkdir()
    (config / "svc.yaml").write_text("namespace: x\nservices:\n  - {host: a.x, port: 80}\n")
    result = subprocess.run(
        _command(config), env=_env(tmp_path), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "svc.yaml: services[0].port: unknown key" in result.stderr
