"""Configuration: Istio's cluster.env taken unchanged, precedence, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmagent.config import ConfigError, load_config, parse_duration, parse_env_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "istio-onboarding"
NO_FILE = {"VMAGENT_CLUSTER_ENV": "/dev/null"}


def test_istioctl_cluster_env_is_taken_unchanged() -> None:
    config = load_config({}, cluster_env=FIXTURES / "ipv4" / "cluster.env")
    assert config.pod_namespace == "bar" and config.namespace == "bar"
    assert config.service_account == "vm-serviceaccount"
    assert config.trust_domain == ""  # written as '' by istioctl: empty, not the default
    assert config.istio_meta_dns_capture is True
    assert config.ca_addr == "istiod-rev-1.istio-system.svc:15012"
    assert config.istio_svc_ip == "10.10.10.10"
    assert config.sources["POD_NAMESPACE"].startswith("file:")
    assert config.sources["DNS_PROXY_ADDR"] == "default"


def test_ipv6_onboarding_file_is_taken_unchanged() -> None:
    config = load_config({}, cluster_env=FIXTURES / "ipv6" / "cluster.env")
    assert ":" in config.istio_svc_ip


def test_json_labels_and_quotes_survive_parsing() -> None:
    text = (FIXTURES / "ipv4" / "cluster.env").read_text()
    values = parse_env_file(text, "cluster.env")
    assert values["ISTIO_METAJSON_LABELS"] == (
        '{"service.istio.io/canonical-name":"foo","service.istio.io/canonical-revision":"latest"}'
    )
    assert parse_env_file("export A='x y' # note\nB=\"q\"\n\n# c\n", "f") == {"A": "x y", "B": "q"}


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    env_file = tmp_path / "cluster.env"
    env_file.write_text("POD_NAMESPACE='from-file'\nSERVICE_ACCOUNT='sa-file'\nTRUST_DOMAIN=td\n")
    config = load_config(
        {"POD_NAMESPACE": "from-env", "SERVICE_ACCOUNT": "sa-env"},
        overrides={"POD_NAMESPACE": "from-flag"},
        cluster_env=env_file,
    )
    assert config.pod_namespace == "from-flag" and config.sources["POD_NAMESPACE"] == "flag"
    assert config.service_account == "sa-env" and config.sources["SERVICE_ACCOUNT"] == "env"
    assert config.trust_domain == "td"
    assert config.vmagent_dns_ttl == 30 and config.sources["VMAGENT_DNS_TTL"] == "default"


def test_namespace_falls_back_like_istio_start_sh() -> None:
    assert load_config(NO_FILE).namespace == "default"
    assert load_config({**NO_FILE, "ISTIO_NAMESPACE": "vmns"}).namespace == "vmns"


def test_values_are_typed() -> None:
    config = load_config(
        {
            **NO_FILE,
            "DNS_FORWARD_PARALLEL": "1",
            "DNS_FORWARD_TIMEOUT": "1m30s",
            "DNS_PROXY_ADDR": "127.0.0.1:53, [::1]:53",
            "SECRET_TTL": "24h0m0s",
        }
    )
    assert config.dns_forward_parallel is True
    assert config.dns_forward_timeout == 90.0
    assert config.dns_proxy_addr == ("127.0.0.1:53", "[::1]:53")
    assert config.secret_ttl == 86400.0


def test_config_is_immutable() -> None:
    config = load_config(NO_FILE)
    with pytest.raises(AttributeError):
        config.pod_namespace = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"DNS_FORWARD_PARALLEL": "yes"}, "DNS_FORWARD_PARALLEL='yes' (from env): expected a bool"),
        ({"VMAGENT_DNS_TTL": "thirty"}, "VMAGENT_DNS_TTL='thirty' (from env): expected a whole"),
        ({"VMAGENT_DNS_TTL": "-1"}, "VMAGENT_DNS_TTL='-1' (from env): must be between 0 and"),
        ({"DNS_FORWARD_TIMEOUT": "5 parsecs"}, "expected a duration"),
    ],
)
def test_malformed_values_name_the_key_and_source(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({**NO_FILE, **environ})
    assert message in str(info.value)


def test_bad_cluster_env_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "cluster.env"
    bad.write_text("GOOD=1\nthis is not an assignment\n")
    with pytest.raises(ConfigError, match=r"cluster.env:2: expected KEY=value"):
        load_config({}, cluster_env=bad)
    bad.write_text("A='unterminated\n")
    with pytest.raises(ConfigError, match="A: bad quoting"):
        load_config({}, cluster_env=bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config({}, cluster_env=tmp_path / "missing.env")


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    env_file = tmp_path / "cluster.env"
    env_file.write_text("SOMETHING_ISTIO_ADDS_LATER='x'\n")
    assert load_config({}, cluster_env=env_file).namespace == "default"


def test_durations() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2") == 2.0
    with pytest.raises(ValueError):
        parse_duration("")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmagent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **NO_FILE, **(env or {})},
    )


def test_cli_version_help_and_config_show() -> None:
    assert run_cli("--version").stdout.startswith("vmagent ")
    helped = run_cli("--help")
    assert helped.returncode == 0 and "dns" in helped.stdout and "config" in helped.stdout
    shown = run_cli("config", "show", env={"POD_NAMESPACE": "web"})
    assert shown.returncode == 0
    line = next(row for row in shown.stdout.splitlines() if row.startswith("POD_NAMESPACE "))
    assert "'web'" in line and line.rstrip().endswith("env")


def test_cli_reports_a_bad_setting_clearly() -> None:
    result = run_cli("config", "show", env={"DNS_FORWARD_PARALLEL": "maybe"})
    assert result.returncode == 2
    assert "configuration error: DNS_FORWARD_PARALLEL='maybe'" in result.stderr
