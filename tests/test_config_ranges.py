"""Every number in the configuration has an allowed range, checked at load, and the error names
the key, where the value came from and what is allowed. ``config show`` prints each kind of
value as a user writes it (ratios as ratios, durations as durations)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import Field
from pathlib import Path
from typing import Any

import pytest

from vmagent.config import ConfigError, describe, env_key, load_config, settings
from vmagent.config_values import MIN_SECRET_TTL
from vmagent.identity.rotation import MIN_CSR_INTERVAL, Schedule, rotation_time

NO_FILES = {"VMAGENT_CLUSTER_ENV": "/dev/null", "VMAGENT_MESH_CONFIG": "/dev/null"}


def load_error(environ: dict[str, str], **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config({**NO_FILES, **environ}, **kwargs)
    return str(info.value)


def test_a_grace_ratio_of_seven_is_refused_with_key_source_and_range() -> None:
    # SECRET_GRACE_PERIOD_RATIO=7 used to make the agent renew every ~10 ms.
    message = load_error({"SECRET_GRACE_PERIOD_RATIO": "7"})
    assert message == (
        "SECRET_GRACE_PERIOD_RATIO='7' (from env): must be between 0 and 1, not 0 or 1"
    )


def test_the_source_is_named_for_flags_files_and_mesh_metadata(tmp_path: Path) -> None:
    assert "(from flag)" in load_error({}, overrides={"SECRET_GRACE_PERIOD_RATIO": "1.5"})
    cluster_env = tmp_path / "cluster.env"
    cluster_env.write_text("SECRET_TTL='-5s'\n")
    message = load_error({"VMAGENT_CLUSTER_ENV": str(cluster_env)})
    assert f"SECRET_TTL='-5s' (from file:{cluster_env})" in message
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("defaultConfig:\n  proxyMetadata:\n    VMAGENT_DNS_TCP_MAX_CONNECTIONS: '0'\n")
    message = load_error({"VMAGENT_MESH_CONFIG": str(mesh)})
    assert f"VMAGENT_DNS_TCP_MAX_CONNECTIONS='0' (from mesh:{mesh}): must be between 1 and" in (
        message
    )


def _numeric(field: Field[Any]) -> bool:
    return isinstance(field.default, (int, float)) and not isinstance(field.default, bool)


NUMERIC = [env_key(f) for f in settings() if _numeric(f)]


@pytest.mark.parametrize("key", NUMERIC)
def test_every_number_has_both_bounds(key: str) -> None:
    """Each ratio, duration and count refuses a negative and an absurdly large value."""
    for raw in ("-1", str(10**15)):
        message = load_error({key: raw})
        assert message.startswith(f"{key}={raw!r} (from env): "), message
        assert "must be between" in message or "must not be negative" in message, message
        if key == "SECRET_TTL":  # says why the floor is there (issue 7 §2)
            assert "at most once every 5s" in message or "negative" in message, message


@pytest.mark.parametrize(
    ("key", "raw", "allowed"),
    [
        ("VMAGENT_STATUS_ADDR", "127.0.0.1:0", "between 1 and 65535"),
        ("VMAGENT_STATUS_ADDR", "127.0.0.1:70000", "between 1 and 65535"),
        ("VMAGENT_STATUS_ADDR", "127.0.0.1", "expected HOST:PORT"),
        ("DNS_PROXY_ADDR", "127.0.0.1:99999", "between 1 and 65535"),
        ("DNS_PROXY_ADDR", "dns.example:53", "expected an IP address or localhost"),
        ("VMAGENT_DNS_UPSTREAMS", "10.0.0.1:0", "between 1 and 65535"),
        ("CA_ADDR", "istiod:123456", "between 1 and 65535"),
        ("GCE_METADATA_HOST", "metadata:0", "between 1 and 65535"),
        ("CREDENTIAL_FETCHER_TYPE", "bogus", "expected one of auto, JWT, GoogleComputeEngine"),
        ("ECC_SIGNATURE_ALGORITHM", "DSA", "expected one of ECDSA, RSA"),
        ("ECC_CURVE", "P521", "expected one of P256, P384"),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "v7", "expected one of IPv4, IPv6"),
        ("WORKLOAD_RSA_KEY_SIZE", "1024", "between 2048 and 8192"),
        ("SECRET_TTL", "500ms", "between 10s and 8760h"),
        ("SECRET_TTL", "9s", "would expire before its successor arrives"),
        ("VMAGENT_AZURE_METADATA_ENDPOINT", "169.254.169.254", "http:// or https:// URL"),
    ],
)
def test_ports_addresses_and_choices_are_checked(key: str, raw: str, allowed: str) -> None:
    message = load_error({key: raw})
    assert message.startswith(f"{key}={raw!r} (from env): "), message
    assert allowed in message, message


def test_any_ratio_inside_zero_and_one_is_accepted_and_clamped_at_use() -> None:
    # Documented as allowed; Istio clamps ratio ± jitter into [0, 1] (reference §1.6), so no
    # cross-check refuses 0.99 with the default jitter (the old code did).
    config = load_config({**NO_FILES, "SECRET_GRACE_PERIOD_RATIO": "0.99"})
    assert config.secret_grace_period_ratio == 0.99
    edge = {"SECRET_GRACE_PERIOD_RATIO": "0.98", "SECRET_GRACE_PERIOD_RATIO_JITTER": "0.99"}
    assert load_config({**NO_FILES, **edge}).secret_grace_period_ratio_jitter == 0.99
    schedule = Schedule(ratio=0.98, jitter=0.99)
    for r in (-1.0, 0.0, 0.999):  # the jitter's extremes: renewal stays inside the lifetime
        assert 1000.0 <= rotation_time(1000.0, 1010.0, schedule, r) <= 1010.0
    for key, raw in (
        ("SECRET_GRACE_PERIOD_RATIO", "0"),
        ("SECRET_GRACE_PERIOD_RATIO", "1"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "1"),
    ):
        assert "must be between 0 and 1, not" in load_error({key: raw})
    assert load_config({**NO_FILES, "SECRET_GRACE_PERIOD_RATIO_JITTER": "0"})


def test_the_shortest_certificate_lifetime_outlives_two_csr_intervals() -> None:
    # SECRET_TTL=1s used to pass: one 1-second certificate per 5 s, the agent never ready.
    assert MIN_SECRET_TTL >= 2 * MIN_CSR_INTERVAL
    assert load_config({**NO_FILES, "SECRET_TTL": "10s"}).secret_ttl == 10.0  # bench's value
    message = load_error({"SECRET_TTL": "1s"})
    assert message.startswith("SECRET_TTL='1s' (from env): must be between 10s and 8760h")


def test_dns_beyond_this_host_needs_the_explicit_switch() -> None:
    message = load_error({"DNS_PROXY_ADDR": "0.0.0.0:15053"})
    assert "DNS_PROXY_ADDR='0.0.0.0:15053' (from env): not a loopback address" in message
    assert "VMAGENT_DNS_ALLOW_NON_LOOPBACK=true" in message
    allowed = {"DNS_PROXY_ADDR": "0.0.0.0:15053", "VMAGENT_DNS_ALLOW_NON_LOOPBACK": "true"}
    assert load_config({**NO_FILES, **allowed}).dns_proxy_addr == ("0.0.0.0:15053",)


def test_every_bad_key_is_reported_at_once() -> None:
    message = load_error({"CREDENTIAL_FETCHER_TYPE": "bogus", "VMAGENT_DNS_TTL": "-3"})
    assert "CREDENTIAL_FETCHER_TYPE='bogus'" in message and "VMAGENT_DNS_TTL='-3'" in message


def test_accepted_values_still_load() -> None:
    config = load_config(
        {
            **NO_FILES,
            "CREDENTIAL_FETCHER_TYPE": "googlecomputeengine",  # Istio compares ignoring case
            "SECRET_GRACE_PERIOD_RATIO": "0.8",
            "SECRET_TTL": "10s",
            "GCE_METADATA_HOST": "http://127.0.0.1:8080",
            "VMAGENT_STATUS_ADDR": "[::1]:15020",
            "DNS_PROXY_ADDR": "localhost:53,[::1]:5353",
            "VMAGENT_DNS_CACHE_ENTRIES": "0",
        }
    )
    assert config.secret_grace_period_ratio == 0.8 and config.secret_ttl == 10.0


def test_config_show_prints_ratios_as_ratios_and_durations_as_durations() -> None:
    shown = {key: value for key, value, _ in describe(load_config(NO_FILES))}
    assert shown["SECRET_GRACE_PERIOD_RATIO"] == "0.5"
    assert shown["SECRET_GRACE_PERIOD_RATIO_JITTER"] == "0.01"
    assert shown["SECRET_TTL"] == "24h"
    assert shown["DNS_FORWARD_TIMEOUT"] == "5s"
    assert shown["VMAGENT_DNS_ATTEMPT_TIMEOUT"] == "2s"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmagent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **NO_FILES, **env},
        check=False,
    )


def test_cli_config_show_and_a_bad_ratio() -> None:
    shown = run_cli("config", "show")
    line = next(r for r in shown.stdout.splitlines() if r.startswith("SECRET_GRACE_PERIOD_RATIO "))
    assert "'0.5'" in line and "0.5s" not in line
    bad = run_cli("config", "show", SECRET_GRACE_PERIOD_RATIO="7")
    assert bad.returncode == 2
    assert "SECRET_GRACE_PERIOD_RATIO='7' (from env): must be between 0 and 1" in bad.stderr
