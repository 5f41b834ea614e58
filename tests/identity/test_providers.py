"""Credential providers against metadata emulators on 127.0.0.1, and auto detection."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vmagent.identity.detect import detect
from vmagent.identity.providers import (
    AwsProvider,
    AzureProvider,
    GceProvider,
    TokenFileProvider,
    aws_endpoint,
)
from vmagent.identity.tokens import CredentialError, decode_aws, decode_azure, decode_jwt

from .emulators import AwsEmulator, AzureEmulator, CloudKeys, GceEmulator
from .helpers import make_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def keys() -> CloudKeys:
    return CloudKeys()


def fetch(provider: object, now: float | None = None) -> object:
    return asyncio.run(provider.fetch(time.time() if now is None else now))  # type: ignore[attr-defined]


def test_token_file_reread_trimmed_and_bad_files(tmp_path: Path, keys: CloudKeys) -> None:
    path = tmp_path / "istio-token"
    provider = TokenFileProvider(str(path))
    with pytest.raises(CredentialError, match="does not exist"):
        fetch(provider)
    path.write_text("  \n")
    with pytest.raises(CredentialError, match="is empty"):
        fetch(provider)
    path.write_text(keys.gce_jwt("istio-ca", lifetime=-10))
    with pytest.raises(CredentialError, match="expired"):
        fetch(provider)
    fresh = keys.gce_jwt("istio-ca")
    path.write_text(f"\n{fresh}  \n")
    assert fetch(provider).token == fresh  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "opaque",
    [
        "garbage-not-a-jwt",
        "eyJub3QiOiJqc29uIn0.eyJub3QgYSBKV1Q.c2ln",  # three parts, header not a JOSE header
        "aGVsbG8.d29ybGQ.c2ln",  # three base64url parts that are not JSON
        "sha256~0123456789abcdefABCDEF_-",  # an OpenShift-style opaque token
    ],
)
def test_opaque_token_file_is_sent_as_is_and_warned_about_once(
    tmp_path: Path, opaque: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Istio's agent sends istio-token as it is; vmagent refused non-JWTs ("JWT header is not
    JSON"). Now: sent unchanged, expiry unknown, one warning however often it is read."""
    path = tmp_path / "istio-token"
    path.write_text(opaque + "\n")
    provider = TokenFileProvider(str(path))
    with caplog.at_level("WARNING", logger="vmagent.identity.providers"):
        for _ in range(3):
            credential = fetch(provider)
            assert credential.token == opaque  # type: ignore[attr-defined]
            assert credential.expires_at is None  # type: ignore[attr-defined]
    warnings = [r.getMessage() for r in caplog.records if "expiry unknown" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0]


def test_gce_identity_token(tmp_path: Path, keys: CloudKeys) -> None:
    with GceEmulator(keys) as gce:
        config = make_config(
            tmp_path, GCE_METADATA_HOST=f"127.0.0.1:{gce.port}", TRUST_DOMAIN="example.org"
        )
        provider = GceProvider(config)
        credential = fetch(provider)
        claims = decode_jwt(credential.token).claims  # type: ignore[attr-defined]
        assert claims["aud"] == "example.org"  # the audience is the trust domain
        _, path, headers = gce.requests[-1]
        assert path == (
            "/computeMetadata/v1/instance/service-accounts/default/identity"
            "?audience=example.org&format=full"
        )
        assert headers["metadata-flavor"] == "Google"
        asked = len(gce.requests)
        fetch(provider)  # cached: still far from exp
        assert len(gce.requests) == asked
        fetch(provider, time.time() + 3600 - 60)  # near exp: refreshed
        assert len(gce.requests) == asked + 1


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (404, "no service account"),
        (403, "HTTP 403"),
        (500, "HTTP 500"),
        ("timeout", "no answer within"),
        ("garbage", "not a JWT|not UTF-8"),
    ],
)
def test_gce_failures(tmp_path: Path, keys: CloudKeys, fault: int | str, message: str) -> None:
    with GceEmulator(keys) as gce:
        gce.fault = fault
        provider = GceProvider(make_config(tmp_path, GCE_METADATA_HOST=f"127.0.0.1:{gce.port}"))
        with pytest.raises(CredentialError, match=message):
            fetch(provider)


def test_gce_expired_token_is_refused(tmp_path: Path, keys: CloudKeys) -> None:
    with GceEmulator(keys) as gce:
        gce.lifetime = -30
        provider = GceProvider(make_config(tmp_path, GCE_METADATA_HOST=f"127.0.0.1:{gce.port}"))
        with pytest.raises(CredentialError, match="expired"):
            fetch(provider)


def test_aws_imdsv2_document_and_signature(tmp_path: Path, keys: CloudKeys) -> None:
    with AwsEmulator(keys) as aws:
        provider = AwsProvider(make_config(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=aws.url))
        identity = decode_aws(fetch(provider).token)  # type: ignore[attr-defined]
        assert json.loads(identity.document)["instanceId"] == "i-0abc123"
        assert [r[:2] for r in aws.requests] == [
            ("PUT", "/latest/api/token"),
            ("GET", "/latest/dynamic/instance-identity/document"),
            ("GET", "/latest/dynamic/instance-identity/rsa2048"),
        ]
        assert "x-aws-ec2-metadata-token-ttl-seconds" in aws.requests[0][2]


def test_aws_never_falls_back_to_imdsv1(tmp_path: Path, keys: CloudKeys) -> None:
    with AwsEmulator(keys) as aws:
        provider = AwsProvider(make_config(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=aws.url))
        aws.fault = 403  # IMDSv2 token refused
        with pytest.raises(CredentialError, match="IMDSv1 is never used"):
            fetch(provider)
        assert [r[0] for r in aws.requests] == ["PUT"]  # no tokenless GET attempted
        aws.fault = "timeout"
        with pytest.raises(CredentialError, match="hop limit"):
            fetch(provider)
        assert all(r[0] == "PUT" for r in aws.requests)


def test_aws_reads_without_token_get_401(tmp_path: Path, keys: CloudKeys) -> None:
    import urllib.error
    import urllib.request

    with AwsEmulator(keys) as aws:
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(
                f"{aws.url}/latest/dynamic/instance-identity/document", timeout=5
            )
        assert failed.value.code == 401


@pytest.mark.parametrize(
    ("document", "message"),
    [("{not json", "not JSON"), ('{"accountId": "1"}', "no instanceId"), ("", "empty")],
)
def test_aws_garbage_document(tmp_path: Path, keys: CloudKeys, document: str, message: str) -> None:
    with AwsEmulator(keys) as aws:
        aws.document = document
        provider = AwsProvider(make_config(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=aws.url))
        with pytest.raises(CredentialError, match=message):
            fetch(provider)


def test_aws_endpoint_settings(tmp_path: Path) -> None:
    assert aws_endpoint(make_config(tmp_path)) == "http://169.254.169.254"
    ipv6 = make_config(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE="IPv6")
    assert aws_endpoint(ipv6) == "http://[fd00:ec2::254]"
    with pytest.raises(CredentialError, match="expected IPv4 or IPv6"):
        aws_endpoint(replace(make_config(tmp_path), aws_ec2_metadata_service_endpoint_mode="v7"))


def test_azure_attested_document_with_nonce(tmp_path: Path, keys: CloudKeys) -> None:
    with AzureEmulator(keys) as azure:
        provider = AzureProvider(make_config(tmp_path, VMAGENT_AZURE_METADATA_ENDPOINT=azure.url))
        now = time.time()
        identity = decode_azure(fetch(provider, now).token)  # type: ignore[attr-defined]
        assert identity.nonce == str(int(now)) and identity.encoding == "pkcs7"
        assert identity.instance["vmId"] == azure.vm_id
        attested = azure.requests[0]
        assert attested[1].startswith("/metadata/attested/document?api-version=")
        assert f"nonce={int(now)}" in attested[1] and attested[2]["metadata"] == "true"


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (400, "HTTP 400"),
        (500, "HTTP 500"),
        ("garbage", "not UTF-8|not JSON"),
        ("timeout", "no answer"),
    ],
)
def test_azure_failures(tmp_path: Path, keys: CloudKeys, fault: int | str, message: str) -> None:
    with AzureEmulator(keys) as azure:
        azure.fault = fault
        provider = AzureProvider(make_config(tmp_path, VMAGENT_AZURE_METADATA_ENDPOINT=azure.url))
        with pytest.raises(CredentialError, match=message):
            fetch(provider)


def test_unreachable_metadata_server(tmp_path: Path) -> None:
    provider = GceProvider(make_config(tmp_path, GCE_METADATA_HOST="127.0.0.1:9"))
    with pytest.raises(CredentialError, match=r"127\.0\.0\.1:9"):
        fetch(provider)


@pytest.mark.parametrize(
    ("dmi", "source"),
    [
        ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, "GoogleComputeEngine"),
        ({"sys_vendor": "Amazon EC2", "product_name": "t3.micro"}, "AWS"),
        ({"sys_vendor": "Xen", "bios_version": "4.11.amazon"}, "AWS"),
        (
            {
                "sys_vendor": "Microsoft Corporation",
                "product_name": "Virtual Machine",
                "chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77",
            },
            "Azure",
        ),
    ],
)
def test_auto_detects_cloud_from_dmi(tmp_path: Path, dmi: dict[str, str], source: str) -> None:
    folder = tmp_path / "dmi"
    folder.mkdir()
    for name, value in dmi.items():
        (folder / name).write_text(value + "\n")
    detection = asyncio.run(detect(make_config(tmp_path, VMAGENT_DMI_ROOT=str(folder))))
    assert detection.source == source and "DMI" in detection.reason


@pytest.mark.parametrize("cloud", ["GoogleComputeEngine", "AWS", "Azure", None])
def test_auto_probes_metadata_servers_then_token_file(
    tmp_path: Path, keys: CloudKeys, cloud: str | None
) -> None:
    (tmp_path / "dmi").mkdir()
    (tmp_path / "dmi" / "sys_vendor").write_text("QEMU\n")
    servers = {
        "GoogleComputeEngine": GceEmulator(keys),
        "AWS": AwsEmulator(keys),
        "Azure": AzureEmulator(keys),
    }
    dead = "127.0.0.1:9"
    endpoint = {k: (f"127.0.0.1:{v.port}" if k == cloud else dead) for k, v in servers.items()}
    config = make_config(
        tmp_path,
        VMAGENT_DMI_ROOT=str(tmp_path / "dmi"),
        GCE_METADATA_HOST=endpoint["GoogleComputeEngine"],
        AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://{endpoint['AWS']}",
        VMAGENT_AZURE_METADATA_ENDPOINT=f"http://{endpoint['Azure']}",
    )
    if cloud:
        with servers[cloud]:
            detection = asyncio.run(detect(config))
        assert detection.source == cloud and "probe" in detection.reason
    else:
        detection = asyncio.run(detect(config))
        assert detection.source == "JWT" and "token file" in detection.reason


def test_explicit_and_unknown_fetcher_type(tmp_path: Path) -> None:
    explicit = asyncio.run(detect(make_config(tmp_path, CREDENTIAL_FETCHER_TYPE="AWS")))
    assert explicit.source == "AWS"
    with pytest.raises(CredentialError, match="CREDENTIAL_FETCHER_TYPE='Mock'"):
        asyncio.run(detect(replace(make_config(tmp_path), credential_fetcher_type="Mock")))
