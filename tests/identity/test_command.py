"""``vmagent identity fetch`` and ``show`` as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from .helpers import agent_values, ca_settings, running_ca

pytestmark = pytest.mark.timeout(90)


async def vmagent(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vmagent",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def test_fetch_keeps_renews_and_show_reports(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin"),
                "VMAGENT_CLUSTER_ENV": str(tmp_path / "cluster.env"),
                **agent_values(tmp_path, ca, CREDENTIAL_FETCHER_TYPE="auto"),
            }
            (tmp_path / "cluster.env").write_text("")

            code, _, err = await vmagent(env, "identity", "fetch")
            assert code == 1 and "istio-token does not exist" in err

            (tmp_path / "istio-token").write_text(
                ca.authority.mint_token("shop", "cart", time.time())
            )
            code, out, err = await vmagent(env, "identity", "fetch")
            assert code == 0, err
            assert out.startswith("issued: spiffe://cluster.local/ns/shop/sa/cart")
            chain = (tmp_path / "state" / "certs" / "cert-chain.pem").read_bytes()

            code, out, _ = await vmagent(env, "identity", "fetch")
            assert code == 0 and out.startswith("kept")
            assert (tmp_path / "state" / "certs" / "cert-chain.pem").read_bytes() == chain

            code, out, err = await vmagent(env, "identity", "fetch", "--force")
            assert code == 0 and out.startswith("issued"), err
            assert (tmp_path / "state" / "certs" / "cert-chain.pem").read_bytes() != chain

            code, out, _ = await vmagent(env, "identity", "show", "--json")
            info = json.loads(out)
            assert code == 0
            assert info["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/cart"
            assert info["source"] == "JWT" and "token file" in info["source_reason"]
            assert info["serial"] and info["not_after"] and info["next_rotation"]
            assert info["last_error"] is None

            code, out, _ = await vmagent(env, "identity", "show")
            assert code == 0 and "spiffe://cluster.local/ns/shop/sa/cart" in out

    asyncio.run(scenario())
