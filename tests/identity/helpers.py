"""Shared test plumbing: configs, a running dev CA, an agent's certificate manager."""

from __future__ import annotations

import contextlib
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from vmagent.config import Config, load_config
from vmagent.devmesh import DevCa, DevCaSettings, IdentityRule
from vmagent.identity import CertificateManager, create_manager

from .emulators import CloudKeys

TRUST_DOMAIN = "cluster.local"


def make_config(tmp_path: Path, **values: str) -> Config:
    """A Config from ``values`` (setting names as environment keys) and nothing else."""
    empty = tmp_path / "cluster.env"
    if not empty.exists():
        empty.write_text("")
    return load_config({}, overrides=values, cluster_env=empty)


def ca_settings(tmp_path: Path, keys: CloudKeys | None = None, **extra: Any) -> DevCaSettings:
    files = keys.write(tmp_path) if keys else {}
    rules = (
        IdentityRule(
            "GoogleComputeEngine",
            {"project_id": "my-project", "instance_name": "vm-1"},
            "gce-ns",
            "gce-sa",
        ),
        IdentityRule(
            "AWS", {"accountId": "123456789012", "instanceId": "i-0abc123"}, "aws-ns", "aws-sa"
        ),
        IdentityRule("Azure", {"subscriptionId": "sub-1111"}, "azure-ns", "azure-sa"),
    )
    fields: dict[str, Any] = {
        "trust_domain": TRUST_DOMAIN,
        "directory": str(tmp_path / "devca"),
        "listen": "127.0.0.1:0",
        "identities": rules,
    }
    if keys:
        fields.update(
            gce_jwks=str(files["jwks"]),
            aws_certificates=(str(files["aws"]),),
            azure_certificates=(str(files["azure"]),),
        )
    fields.update(extra)
    return DevCaSettings(**fields)


@contextlib.asynccontextmanager
async def running_ca(settings: DevCaSettings) -> AsyncIterator[DevCa]:
    ca = DevCa(settings)
    await ca.start()
    try:
        yield ca
    finally:
        await ca.stop()


def agent_values(tmp_path: Path, ca: DevCa, **values: str) -> dict[str, str]:
    """Settings for an agent that talks to ``ca`` and keeps its files under ``tmp_path``."""
    dmi = tmp_path / "dmi"
    dmi.mkdir(exist_ok=True)
    base = {
        "CA_ADDR": ca.address,
        "CA_ROOT_CA": str(Path(ca.settings.directory) / "root-cert.pem"),
        "OUTPUT_CERTS": str(tmp_path / "state" / "certs"),
        "VMAGENT_TOKEN_FILE": str(tmp_path / "istio-token"),
        "VMAGENT_DMI_ROOT": str(dmi),
        "VMAGENT_RUN_DIR": str(tmp_path / "run"),
        "TRUST_DOMAIN": TRUST_DOMAIN,
        "POD_NAMESPACE": "shop",
        "SERVICE_ACCOUNT": "cart",
        "CREDENTIAL_FETCHER_TYPE": "JWT",
        "ISTIO_META_CLUSTER_ID": "vm-cluster",
    }
    base.update(values)
    return base


async def agent(tmp_path: Path, ca: DevCa, **values: str) -> CertificateManager:
    return await create_manager(make_config(tmp_path, **agent_values(tmp_path, ca, **values)), {})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
