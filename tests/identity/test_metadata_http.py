"""Broken metadata servers: bounded retries with backoff, clear errors, never a hammering.

Real HTTP over 127.0.0.1: the emulators of :mod:`.emulators`, and a raw socket server for
answers that are not HTTP at all.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmagent.identity.detect import detect
from vmagent.identity.providers import (
    METADATA_RETRIES,
    AwsProvider,
    AzureProvider,
    GceProvider,
    MetadataHttp,
)
from vmagent.identity.tokens import CredentialError

from .emulators import AwsEmulator, AzureEmulator, CloudKeys, GceEmulator, Reply
from .helpers import make_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def keys() -> CloudKeys:
    return CloudKeys()


def fetch(provider: object) -> object:
    return asyncio.run(provider.fetch(time.time()))  # type: ignore[attr-defined]


class FlakyGce(GceEmulator):
    """Answers ``failures`` requests with ``status`` first, then as GCE does."""

    def __init__(self, keys: CloudKeys, failures: int, status: int) -> None:
        super().__init__(keys)
        self.failures = failures
        self.status = status

    def answer(self, method: str, path: str, headers: dict[str, str]) -> Reply:
        if self.failures > 0:
            self.failures -= 1
            return self.status, {"Content-Type": "text/plain"}, b"backend unavailable"
        return super().answer(method, path, headers)


@pytest.mark.parametrize("status", [500, 503])
def test_persistent_5xx_is_retried_a_bounded_number_of_times(
    tmp_path: Path, keys: CloudKeys, status: int
) -> None:
    with GceEmulator(keys) as gce:
        gce.fault = status
        provider = GceProvider(make_config(tmp_path, GCE_METADATA_HOST=f"127.0.0.1:{gce.port}"))
        started = time.monotonic()
        with pytest.raises(CredentialError, match=f"HTTP {status}: injected failure"):
            fetch(provider)
        assert len(gce.requests) == 1 + METADATA_RETRIES  # bounded, not a hammering
        assert time.monotonic() - started >= 0.4  # with backoff between the attempts


def test_transient_5xx_recovers_within_one_fetch(tmp_path: Path, keys: CloudKeys) -> None:
    with FlakyGce(keys, failures=2, status=503) as gce:
        provider = GceProvider(make_config(tmp_path, GCE_METADATA_HOST=f"127.0.0.1:{gce.port}"))
        assert fetch(provider).token.count(".") == 2  # type: ignore[attr-defined]
        assert len(gce.requests) == 3


def test_4xx_is_not_retried(tmp_path: Path, keys: CloudKeys) -> None:
    with AzureEmulator(keys) as azure:
        azure.fault = 403
        provider = AzureProvider(make_config(tmp_path, VMAGENT_AZURE_METADATA_ENDPOINT=azure.url))
        with pytest.raises(CredentialError, match="HTTP 403"):
            fetch(provider)
        assert len(azure.requests) == 1


def test_aws_token_put_is_retried_on_5xx_then_gives_a_clear_error(
    tmp_path: Path, keys: CloudKeys
) -> None:
    with AwsEmulator(keys) as aws:
        aws.fault = 500
        provider = AwsProvider(make_config(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=aws.url))
        with pytest.raises(CredentialError, match=r"IMDSv2 session token.*HTTP 500"):
            fetch(provider)
        assert [r[0] for r in aws.requests] == ["PUT"] * (1 + METADATA_RETRIES)


@pytest.mark.parametrize(
    ("emulator", "message"),
    [
        ("gce", "GCE identity token: answer is not UTF-8 text"),
        ("aws", "AWS identity document: answer is not UTF-8 text"),
        ("azure", "Azure attested document: answer is not UTF-8 text"),
    ],
)
def test_garbage_bodies_give_a_clear_error(
    tmp_path: Path, keys: CloudKeys, emulator: str, message: str
) -> None:
    servers = {"gce": GceEmulator, "aws": AwsEmulator, "azure": AzureEmulator}
    with servers[emulator](keys) as server:
        values = {
            "gce": {"GCE_METADATA_HOST": f"127.0.0.1:{server.port}"},
            "aws": {"AWS_EC2_METADATA_SERVICE_ENDPOINT": server.url},
            "azure": {"VMAGENT_AZURE_METADATA_ENDPOINT": server.url},
        }[emulator]
        config = make_config(tmp_path, **values)
        provider = {"gce": GceProvider, "aws": AwsProvider, "azure": AzureProvider}[emulator](
            config
        )
        if emulator == "aws":
            asyncio.run(provider.session_token())  # type: ignore[attr-defined]
        server.fault = "garbage"
        with pytest.raises(CredentialError, match=message if emulator != "aws" else "UTF-8|token"):
            fetch(provider)


@pytest.fixture
def not_http() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that answers every connection with bytes that are not HTTP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_an_answer_that_is_not_http_is_a_clear_error(not_http: str) -> None:
    with pytest.raises(
        CredentialError, match=r"GET http://127\.0\.0\.1:\d+/x: .*(BadStatusLine|not HTTP)"
    ):
        MetadataHttp().request_sync("GET", f"{not_http}/x", {})


def test_refused_connection_is_retried_briefly_and_named(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # a port nobody listens on
    port = holder.getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(CredentialError, match=rf"127\.0\.0\.1:{port}.*Connection refused"):
            MetadataHttp().request_sync("GET", f"http://127.0.0.1:{port}/x", {})
        assert time.monotonic() - started < 3.0
    finally:
        holder.close()


def test_environment_proxies_are_not_used_for_metadata(
    tmp_path: Path, keys: CloudKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with GceEmulator(keys) as gce:
        provider = GceProvider(make_config(tmp_path, GCE_METADATA_HOST=f"127.0.0.1:{gce.port}"))
        assert fetch(provider).token  # type: ignore[attr-defined]


def test_probes_are_single_requests(tmp_path: Path, keys: CloudKeys) -> None:
    """Auto detection probes a broken metadata server once, not three times."""
    dmi = tmp_path / "dmi"
    dmi.mkdir()
    with GceEmulator(keys) as gce:
        gce.fault = 500
        config = make_config(
            tmp_path,
            GCE_METADATA_HOST=f"127.0.0.1:{gce.port}",
            AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:9",
            VMAGENT_AZURE_METADATA_ENDPOINT="http://127.0.0.1:9",
            VMAGENT_DMI_ROOT=str(dmi),
        )
        detection = asyncio.run(detect(config))
        assert detection.source == "JWT"
        assert len(gce.requests) == 1
