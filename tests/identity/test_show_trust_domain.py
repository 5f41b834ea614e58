"""``vmagent identity show`` with ``TRUST_DOMAIN=''`` (what istioctl writes: the agent learns
the trust domain from the CA): the configured identity says so, never ``spiffe:///...``, which
is no SPIFFE ID."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from .helpers import agent_values, ca_settings, running_ca
from .test_command import vmagent

pytestmark = pytest.mark.timeout(90)


def test_show_with_empty_trust_domain_prints_no_invalid_spiffe_id(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin"),
                "VMAGENT_CLUSTER_ENV": str(tmp_path / "cluster.env"),
                **agent_values(tmp_path, ca, CREDENTIAL_FETCHER_TYPE="auto"),
            }
            # As istioctl x workload entry configure writes it.
            (tmp_path / "cluster.env").write_text("TRUST_DOMAIN=''\n")
            env.pop("TRUST_DOMAIN", None)
            for args in (("identity", "show"), ("identity", "show", "--json")):
                _, out, err = await vmagent(env, *args)
                assert "spiffe:///" not in out, (args, out, err)
                assert "spiffe://<trust domain learned from the CA>/ns/" in out, (args, out)
            _, out, _ = await vmagent(env, "identity", "show", "--json")
            shown = json.loads(out)["configured_identity"]
            assert shown == "spiffe://<trust domain learned from the CA>/ns/shop/sa/cart"

    asyncio.run(scenario())
