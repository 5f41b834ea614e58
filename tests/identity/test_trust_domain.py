"""``TRUST_DOMAIN=''`` (what ``istioctl x workload entry configure`` writes): the agent takes
the trust domain the CA issues, once, and does not warn on every certificate."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmagent.devmesh.authority import Authority
from vmagent.identity import IdentityError
from vmagent.identity.certs import spiffe_id_problem
from vmagent.identity.manager import create_manager

from .helpers import agent, ca_settings, make_config, running_ca

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "devmesh"
ISTIOCTL_ENV = ROOT / "tests" / "fixtures" / "istio-onboarding" / "ipv4" / "cluster.env"

pytestmark = pytest.mark.timeout(60)


def test_empty_trust_domain_is_learned_from_the_ca_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            (tmp_path / "istio-token").write_text(
                ca.authority.mint_token("shop", "cart", time.time())
            )
            manager = await agent(tmp_path, ca, TRUST_DOMAIN="")
            for _ in range(3):
                bundle = await manager.renew()
                assert bundle.spiffe_id == "spiffe://cluster.local/ns/shop/sa/cart"
            assert manager.identity == "spiffe://cluster.local/ns/shop/sa/cart"
            # A restart learns it from the stored certificate, before any CSR.
            again = await agent(tmp_path, ca, TRUST_DOMAIN="")
            assert again.load_from_disk() is not None
            assert again.identity == "spiffe://cluster.local/ns/shop/sa/cart"

    with caplog.at_level(logging.INFO, logger="vmagent.identity"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "configured identity is" in m]  # was: one per cert
    learned = [m for m in messages if "TRUST_DOMAIN is empty" in m]
    assert len(learned) == 2 and "'cluster.local'" in learned[0]  # once per manager


def test_a_real_identity_mismatch_is_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            (tmp_path / "istio-token").write_text(
                ca.authority.mint_token("shop", "cart", time.time())
            )
            manager = await agent(tmp_path, ca, SERVICE_ACCOUNT="other")
            for _ in range(3):
                await manager.renew()

    with caplog.at_level(logging.WARNING, logger="vmagent.identity"):
        asyncio.run(scenario())
    mismatch = [
        r.getMessage() for r in caplog.records if "configured identity is" in r.getMessage()
    ]
    assert len(mismatch) == 1 and "sa/other" in mismatch[0]


def test_a_ca_issuing_a_spiffe_id_without_trust_domain_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA whose own trust domain is empty issues ``spiffe:///ns/...``: not a SPIFFE ID.
    The agent says the CA is misconfigured, keeps nothing, and adopts nothing."""

    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            (tmp_path / "istio-token").write_text(
                ca.authority.mint_token("shop", "cart", time.time())
            )
            ca.service.trust_domain = ""  # the running CA, misconfigured as istiod could be
            manager = await agent(tmp_path, ca, TRUST_DOMAIN="")
            with pytest.raises(IdentityError, match="has no trust domain") as raised:
                await manager.renew()
            assert "spiffe:///ns/shop/sa/cart" in str(raised.value)
            assert "CA is misconfigured" in str(raised.value)
            assert manager.current is None
            assert not (tmp_path / "state" / "certs" / "cert-chain.pem").exists()
            assert manager.identity == "spiffe:///ns/shop/sa/cart"  # nothing learned
            ca.service.trust_domain = "cluster.local"  # fixed: the next CSR succeeds
            bundle = await manager.renew()
            assert bundle.spiffe_id == "spiffe://cluster.local/ns/shop/sa/cart"
            assert manager.identity == bundle.spiffe_id

    with caplog.at_level(logging.ERROR, logger="vmagent.identity"):
        asyncio.run(scenario())
    assert any("no trust domain" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("spiffe:///ns/vm/sa/vm-web", "no trust domain"),
        ("spiffe://Cluster.Local/ns/vm", "not allowed"),
        ("spiffe://td:8080/ns/vm", "not allowed"),
        ("spiffe://td/ns//sa/x", "empty"),
        ("spiffe://td/ns/../sa", "'..'"),
        ("spiffe://td/ns/vm?x=1", "not allowed"),
        ("spiffe://td/", "empty"),
        ("spiffe://cluster.local/ns/vm/sa/vm-web", ""),
        ("spiffe://td", ""),
    ],
)
def test_spiffe_id_rules(uri: str, problem: str) -> None:
    found = spiffe_id_problem(uri)
    assert (problem in found) if problem else found == ""


def test_dev_ca_with_empty_trust_domain_uses_cluster_local(tmp_path: Path) -> None:
    """``devmesh serve`` with istioctl's cluster.env (``TRUST_DOMAIN=''``), as a process:
    the dev CA says and issues ``cluster.local``, like istiod's default mesh config."""
    config = tmp_path / "mesh"
    shutil.copytree(EXAMPLES, config)
    (tmp_path / "empty.env").write_text("")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "VMAGENT_CLUSTER_ENV": str(tmp_path / "empty.env"),
        "VMAGENT_STATE_DIR": str(tmp_path / "state"),
    }
    command = [
        sys.executable, "-m", "vmagent", "--cluster-env", str(ISTIOCTL_ENV), "devmesh", "serve",
        "--config", str(config), "--dir", str(tmp_path / "ca"),
        "--listen", "127.0.0.1:0", "--debug-listen", "",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        address = re.search(r"listening on (\S+) \(CA", line)
        assert address, line
        (tmp_path / "istio-token").write_text(
            Authority.load_or_create(tmp_path / "ca", "cluster.local", time.time()).mint_token(
                "vm", "vm-web", time.time()
            )
        )
        values = {
            "CA_ADDR": address.group(1),
            "CA_ROOT_CA": str(tmp_path / "ca" / "root-cert.pem"),
            "OUTPUT_CERTS": str(tmp_path / "certs"),
            "VMAGENT_TOKEN_FILE": str(tmp_path / "istio-token"),
            "VMAGENT_DMI_ROOT": str(tmp_path),
            "VMAGENT_RUN_DIR": str(tmp_path / "run"),
            "TRUST_DOMAIN": "",
            "POD_NAMESPACE": "vm",
            "SERVICE_ACCOUNT": "vm-web",
            "CREDENTIAL_FETCHER_TYPE": "JWT",
        }

        async def fetch() -> str:
            manager = await create_manager(make_config(tmp_path, **values), {})
            return (await manager.renew()).spiffe_id

        assert asyncio.run(fetch()) == "spiffe://cluster.local/ns/vm/sa/vm-web"
    finally:
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=20)
    assert "dev CA for trust domain 'cluster.local'" in errors, errors
    assert "trust domain ''" not in errors
