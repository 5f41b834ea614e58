"""``TRUST_DOMAIN=''`` (what ``istioctl x workload entry configure`` writes): the agent takes
the trust domain the CA issues, once, and does not warn on every certificate."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from .helpers import agent, ca_settings, running_ca

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
