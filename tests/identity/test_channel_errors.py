"""Failures talking to the CA say what to do, and gRPC's C core prints nothing on stderr.

``vmagent identity fetch`` runs as a process against a real dev CA over TLS on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from pathlib import Path

import grpc
import pytest

from vmagent.identity.channel import CLIENT_CERT, DNS, NAME, ROOT, TIMEOUT, explain, make_target

from .helpers import agent_values, ca_settings, running_ca
from .test_ca_failures import start_faulty
from .test_command import vmagent

pytestmark = pytest.mark.timeout(90)

# glog/absl lines as gRPC's C core writes them: "E0000 00:00:...", "I1129 12:12:12.98 ..."
C_CORE_LINE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


def environment(tmp_path: Path, values: dict[str, str]) -> dict[str, str]:
    (tmp_path / "cluster.env").write_text("")
    return {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "VMAGENT_CLUSTER_ENV": str(tmp_path / "cluster.env"),
        **values,
    }


def test_name_mismatch_names_the_expected_name_and_istiod_san(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            (tmp_path / "istio-token").write_text(
                ca.authority.mint_token("shop", "cart", time.time())
            )
            values = agent_values(tmp_path, ca, ISTIOD_SAN="istiod.wrong-ns.svc")
            code, _, err = await vmagent(environment(tmp_path, values), "identity", "fetch")
            assert code == 1
            assert "does not name 'istiod.wrong-ns.svc'" in err and "ISTIOD_SAN" in err
            assert not C_CORE_LINE.search(err), err

    asyncio.run(scenario())


def test_wrong_root_names_root_cert_pem_and_no_grpc_lines_on_stderr(tmp_path: Path) -> None:
    """Before: "UNAVAILABLE: failed to connect to all addresses; ... BAD_SIGNATURE" and a raw
    "I1129 ... ssl_transport_security.cc ... Handshake failed" line from gRPC on stderr."""

    async def scenario() -> None:
        other = tmp_path / "other"
        async with running_ca(ca_settings(other)):
            pass  # only its root is wanted
        config_dir = tmp_path / "etc-vmagent"
        config_dir.mkdir()
        shutil.copy(other / "devca" / "root-cert.pem", config_dir / "root-cert.pem")
        async with running_ca(ca_settings(tmp_path)) as ca:
            (tmp_path / "istio-token").write_text(
                ca.authority.mint_token("shop", "cart", time.time())
            )
            values = agent_values(tmp_path, ca, VMAGENT_CONFIG_DIR=str(config_dir))
            del values["CA_ROOT_CA"]  # the onboarding default: <config dir>/root-cert.pem
            code, _, err = await vmagent(environment(tmp_path, values), "identity", "fetch")
            assert code == 1
            assert f"not signed by the root certificate {config_dir / 'root-cert.pem'}" in err
            assert "root-cert.pem from this mesh's onboarding files" in err
            assert not C_CORE_LINE.search(err), err

    asyncio.run(scenario())


def test_opaque_token_reaches_the_ca_as_is(tmp_path: Path) -> None:
    """Before: "vmagent identity fetch: failed: token file ...: JWT header is not JSON"."""

    async def scenario() -> None:
        ca, service = await start_faulty(tmp_path)
        try:
            opaque = "eyJub3QiOiJqc29uIn0.bm90IGpzb24.c2ln"
            (tmp_path / "istio-token").write_text(opaque + "\n")
            values = agent_values(tmp_path, ca)
            code, _, err = await vmagent(environment(tmp_path, values), "identity", "fetch")
            assert "JWT header" not in err
            assert service.requests, err
            assert service.requests[-1][1]["authorization"] == f"Bearer {opaque}"
            assert code == 1 and "UNAUTHENTICATED" in err  # the dev CA's verdict, not ours
        finally:
            await ca.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("details", "kind", "words"),
    [
        (
            "errors resolving istiod.istio-system.svc:15012: [field:hostname lookup error:"
            "address lookup failed for istiod.istio-system.svc:15012: Domain name not found]",
            DNS,
            [
                "cannot resolve the CA address 'istiod.istio-system.svc' (CA_ADDR)",
                "the line for istiod.istio-system.svc from the onboarding `hosts` file",
                "to /etc/hosts",
            ],
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Custom "
            "verification check failed with error: UNAUTHENTICATED: Hostname Verification "
            "Check failed.",
            NAME,
            ["does not name 'istiod.istio-system.svc'", "set ISTIOD_SAN"],
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls "
            "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines"
            ":OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: self signed certificate in chain",
            ROOT,
            ["/etc/vmagent/root-cert.pem (root-cert.pem)"],
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls "
            "handshake failed: SSL_ERROR_SSL: error:10000418:SSL routines:OPENSSL_internal:"
            "TLSV1_ALERT_UNKNOWN_CA",
            CLIENT_CERT,
            ["refused because of our client certificate"],
        ),
    ],
)
def test_explain_gives_the_reason_and_what_to_do(details: str, kind: str, words: list[str]) -> None:
    target = make_target("istiod.istio-system.svc:15012", "", (), "/etc/vmagent")
    failure = explain(target, grpc.StatusCode.UNAVAILABLE, details, client_cert_sent=True)
    assert failure.kind == kind
    for word in words:
        assert word in failure.message


def test_a_timeout_says_how_long() -> None:
    target = make_target("istiod.istio-system.svc:15012", "", (), "/etc/vmagent")
    failure = explain(target, None, "", client_cert_sent=False, timeout=5.0)
    assert failure.kind == TIMEOUT and "timed out after 5 s" in failure.message
