"""Log and error wording a user reads first: the first certificate is *requested* (nothing
is renewed yet), and an unresolvable address is the address's fault, not the CA's."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
import pytest

from vmagent.identity import IdentityError
from vmagent.identity.ca_client import ca_target
from vmagent.identity.channel import DNS, explain
from vmagent.xds.clienttypes import xds_target

from .helpers import agent, ca_settings, make_config, running_ca

pytestmark = pytest.mark.timeout(60)

RESOLVE_DETAILS = (
    "DNS resolution failed for istiod-rev-1.istio-system.svc:15012: C-ares status is not "
    "ARES_SUCCESS qtype=A name=istiod-rev-1.istio-system.svc is_balancer=0: Domain name not found"
)


def test_first_failure_is_a_request_later_ones_a_renewal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            manager = await agent(tmp_path, ca)
            (tmp_path / "istio-token").write_text("")  # no credential yet: the request fails
            with pytest.raises(IdentityError):
                await manager.renew()
            (tmp_path / "istio-token").write_text(
                ca.authority.mint_token("shop", "cart", time.time())
            )
            await manager.renew()
            (tmp_path / "istio-token").unlink()
            await ca.stop()  # the CA goes away: now a renewal fails
            with pytest.raises(IdentityError):
                await manager.renew()

    with caplog.at_level(logging.ERROR, logger="vmagent.identity"):
        asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert errors[0].startswith("certificate request failed: "), errors
    assert errors[1].startswith("certificate renewal failed: "), errors
    assert errors[1].endswith("keeping the current one"), errors


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (
            {"CA_ADDR": "istiod-rev-1.istio-system.svc:15012"},
            "cannot resolve the CA address 'istiod-rev-1.istio-system.svc' (CA_ADDR): ",
        ),
        (
            {"PROXY_CONFIG": '{"discoveryAddress": "istiod-rev-1.istio-system.svc:15012"}'},
            "cannot resolve the CA address 'istiod-rev-1.istio-system.svc' (CA_ADDR unset: "
            "discoveryAddress): ",
        ),
    ],
)
def test_unresolvable_ca_address_names_the_address_and_the_hosts_file(
    tmp_path: Path, values: dict[str, str], words: str
) -> None:
    target = ca_target(make_config(tmp_path, **values))
    failure = explain(target, grpc.StatusCode.UNAVAILABLE, RESOLVE_DETAILS, client_cert_sent=False)
    assert failure.kind == DNS
    assert failure.message.startswith(words), failure.message
    assert "onboarding `hosts` file" in failure.message and "/etc/hosts" in failure.message


def test_unresolvable_discovery_address_says_discovery(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, PROXY_CONFIG='{"discoveryAddress": "istiod-rev-1.istio-system.svc:15012"}'
    )
    failure = explain(
        xds_target(config), grpc.StatusCode.UNAVAILABLE, RESOLVE_DETAILS, client_cert_sent=False
    )
    assert failure.message.startswith(
        "cannot resolve the discovery address 'istiod-rev-1.istio-system.svc' (the mesh "
        "config's discoveryAddress): "
    ), failure.message
