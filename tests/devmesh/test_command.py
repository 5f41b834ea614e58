"""``vmagent devmesh ca`` and ``devmesh token`` run alone, with a YAML settings file."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from identity.emulators import CloudKeys
from identity.helpers import make_config

from vmagent.devmesh.settings import SettingsError, load_settings
from vmagent.identity import create_manager

pytestmark = pytest.mark.timeout(60)


def test_devmesh_ca_process_issues_to_an_agent(tmp_path: Path) -> None:
    keys = CloudKeys()
    files = keys.write(tmp_path)
    settings = tmp_path / "devmesh.yaml"
    settings.write_text(f"""
trustDomain: example.org
dir: keys
gce: {{jwks: {files["jwks"].name}}}
identities:
  - source: GoogleComputeEngine
    match: {{project_id: my-project}}
    namespace: web
    serviceAccount: frontend
""")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "VMAGENT_CLUSTER_ENV": str(tmp_path / "cluster.env"),
    }
    (tmp_path / "cluster.env").write_text("")
    token = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmagent",
            "devmesh",
            "token",
            "--config",
            str(settings),
            "--namespace",
            "shop",
            "--service-account",
            "cart",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    (tmp_path / "istio-token").write_text(token)
    assert (tmp_path / "keys" / "root-cert.pem").exists()

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmagent",
            "devmesh",
            "ca",
            "--config",
            str(settings),
            "--listen",
            "127.0.0.1:0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("dev CA listening on 127.0.0.1:"), line
        address = line.split()[4].rstrip(";")

        async def fetch() -> str:
            config = make_config(
                tmp_path,
                CA_ADDR=address,
                CA_ROOT_CA=str(tmp_path / "keys" / "root-cert.pem"),
                OUTPUT_CERTS=str(tmp_path / "certs"),
                TRUST_DOMAIN="example.org",
                CREDENTIAL_FETCHER_TYPE="JWT",
                VMAGENT_TOKEN_FILE=str(tmp_path / "istio-token"),
            )
            manager = await create_manager(config, {})
            return (await manager.renew()).spiffe_id

        assert asyncio.run(fetch()) == "spiffe://example.org/ns/shop/sa/cart"
    finally:
        process.terminate()
        process.wait(10)


def test_settings_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("identities:\n  - source: Oracle\n    match: {a: b}\n")
    with pytest.raises(SettingsError, match=r"identities\[0\]\.source"):
        load_settings(str(path), "cluster.local", str(tmp_path))
    path.write_text("identities:\n  - source: AWS\n    match: {accountId: '1'}\n")
    with pytest.raises(SettingsError, match="namespace and serviceAccount are required"):
        load_settings(str(path), "cluster.local", str(tmp_path))
