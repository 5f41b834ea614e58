"""Parsing Istio's ReadinessProbe as onboarding files and WorkloadGroups carry it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vmagent.health import (
    ExecAction,
    GrpcAction,
    HttpGetAction,
    ProbeSpec,
    ProbeSpecError,
    TcpSocketAction,
    parse_probe,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "istio-onboarding"


def _fixture(*parts: str) -> Any:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return yaml.safe_load(path.read_text())


def test_mesh_yaml_from_istioctl_gets_istio_defaults() -> None:
    mesh = _fixture("ipv4", "mesh.yaml")
    spec = parse_probe(mesh["defaultConfig"]["readinessProbe"])
    assert spec == ProbeSpec(
        action=HttpGetAction(port=8080, path="/", host="localhost", scheme="http", headers=()),
        initial_delay_seconds=0,
        timeout_seconds=1,
        period_seconds=10,
        success_threshold=1,
        failure_threshold=1,
    )
    assert spec.kind == "httpGet"
    assert spec.action.url == "http://localhost:8080/"  # type: ignore[union-attr]


def test_workloadgroup_probe_parses_the_same() -> None:
    group = _fixture("ipv6", "workloadgroup.yaml")
    mesh = _fixture("ipv4", "mesh.yaml")
    assert parse_probe(group["spec"]["probe"]) == parse_probe(
        mesh["defaultConfig"]["readinessProbe"]
    )


FULL_HTTP = """
initialDelaySeconds: 5
timeoutSeconds: 3
periodSeconds: 4
successThreshold: 2
failureThreshold: 6
httpGet:
  path: /ready?full=1
  port: 8443
  host: 10.0.0.7
  scheme: HTTPS
  httpHeaders:
  - name: Host
    value: app.example.com
  - name: X-Probe
    value: "yes"
"""


def test_every_field_is_read_and_scheme_lower_cased() -> None:
    spec = parse_probe(yaml.safe_load(FULL_HTTP))
    assert spec == ProbeSpec(
        action=HttpGetAction(
            port=8443,
            path="/ready?full=1",
            host="10.0.0.7",
            scheme="https",
            headers=(("Host", "app.example.com"), ("X-Probe", "yes")),
        ),
        initial_delay_seconds=5,
        timeout_seconds=3,
        period_seconds=4,
        success_threshold=2,
        failure_threshold=6,
    )


def test_proto_field_names_are_accepted_like_protojson() -> None:
    snake = {
        "initial_delay_seconds": 5,
        "timeout_seconds": 3,
        "period_seconds": 4,
        "success_threshold": 2,
        "failure_threshold": 6,
        "http_get": {
            "path": "/ready?full=1",
            "port": 8443,
            "host": "10.0.0.7",
            "scheme": "https",
            "http_headers": [
                {"name": "Host", "value": "app.example.com"},
                {"name": "X-Probe", "value": "yes"},
            ],
        },
    }
    assert parse_probe(snake) == parse_probe(yaml.safe_load(FULL_HTTP))


def test_zero_and_null_values_mean_defaults() -> None:
    spec = parse_probe(
        {
            "timeoutSeconds": 0,
            "periodSeconds": 0,
            "successThreshold": 0,
            "failureThreshold": None,
            "httpGet": {"port": 80, "path": "", "scheme": "", "host": ""},
        }
    )
    assert (spec.timeout_seconds, spec.period_seconds) == (1, 10)
    assert (spec.success_threshold, spec.failure_threshold) == (1, 1)
    assert spec.action == HttpGetAction(port=80, path="/", host="localhost", scheme="http")


def test_relative_path_and_bracketed_ipv6_host() -> None:
    spec = parse_probe({"httpGet": {"port": 80, "path": "healthz", "host": "[::1]"}})
    assert spec.action == HttpGetAction(port=80, path="/healthz", host="::1")
    assert spec.action.url == "http://[::1]:80/healthz"


def test_tcp_exec_and_grpc_probes() -> None:
    assert parse_probe({"tcpSocket": {"port": 3306}}).action == TcpSocketAction(3306, "localhost")
    assert parse_probe({"tcpSocket": {"port": 22, "host": "10.1.2.3"}}).action == TcpSocketAction(
        22, "10.1.2.3"
    )
    exec_spec = parse_probe({"exec": {"command": ["/bin/check", "--quiet"]}, "timeoutSeconds": 5})
    assert exec_spec.action == ExecAction(("/bin/check", "--quiet"))
    assert exec_spec.kind == "exec"
    assert exec_spec.timeout_seconds == 5
    grpc_spec = parse_probe({"grpc": {"port": 9000, "service": "pkg.Svc"}})
    assert grpc_spec.action == GrpcAction(port=9000, service="pkg.Svc", host="localhost")


BAD: list[tuple[str, Any, str, str]] = [
    ("two kinds", {"httpGet": {"port": 1}, "tcpSocket": {"port": 2}}, "readinessProbe", "only one"),
    ("no kind", {"periodSeconds": 5}, "readinessProbe", "one of httpGet"),
    ("kind set to null", {"exec": None}, "readinessProbe", "one of httpGet"),
    ("no port", {"httpGet": {"path": "/x"}}, "readinessProbe.httpGet.port", "required"),
    ("port zero", {"tcpSocket": {"port": 0}}, "readinessProbe.tcpSocket.port", "required"),
    ("port too big", {"grpc": {"port": 70000}}, "readinessProbe.grpc.port", "at most 65535"),
    ("named port", {"httpGet": {"port": "http"}}, "readinessProbe.httpGet.port", "integer"),
    (
        "negative",
        {"periodSeconds": -1, "httpGet": {"port": 1}},
        "readinessProbe.periodSeconds",
        "negative",
    ),
    (
        "negative delay",
        {"initialDelaySeconds": -5, "tcpSocket": {"port": 1}},
        "readinessProbe.initialDelaySeconds",
        "negative",
    ),
    (
        "string number",
        {"timeoutSeconds": "3", "httpGet": {"port": 1}},
        "readinessProbe.timeoutSeconds",
        "expected an integer, got a string",
    ),
    (
        "bool number",
        {"failureThreshold": True, "httpGet": {"port": 1}},
        "readinessProbe.failureThreshold",
        "got a boolean",
    ),
    (
        "float number",
        {"periodSeconds": 1.5, "httpGet": {"port": 1}},
        "readinessProbe.periodSeconds",
        "got a number",
    ),
    (
        "unknown scheme",
        {"httpGet": {"port": 1, "scheme": "FTP"}},
        "readinessProbe.httpGet.scheme",
        "'ftp'",
    ),
    (
        "scheme not a string",
        {"httpGet": {"port": 1, "scheme": 443}},
        "readinessProbe.httpGet.scheme",
        "expected a string",
    ),
    (
        "unknown field",
        {"periodSecond": 5, "httpGet": {"port": 1}},
        "readinessProbe.periodSecond",
        "unknown field",
    ),
    (
        "kubernetes-only field",
        {"httpGet": {"port": 1, "headers": []}},
        "readinessProbe.httpGet.headers",
        "unknown field",
    ),
    (
        "both spellings",
        {"periodSeconds": 5, "period_seconds": 6, "httpGet": {"port": 1}},
        "readinessProbe.periodSeconds",
        "twice",
    ),
    ("probe not a mapping", ["httpGet"], "readinessProbe", "expected a mapping, got a list"),
    ("kind not a mapping", {"httpGet": 8080}, "readinessProbe.httpGet", "expected a mapping"),
    (
        "headers not a list",
        {"httpGet": {"port": 1, "httpHeaders": {"a": "b"}}},
        "readinessProbe.httpGet.httpHeaders",
        "expected a list",
    ),
    (
        "header without name",
        {"httpGet": {"port": 1, "httpHeaders": [{"value": "v"}]}},
        "readinessProbe.httpGet.httpHeaders[0].name",
        "not a valid header name",
    ),
    (
        "header injection",
        {"httpGet": {"port": 1, "httpHeaders": [{"name": "A", "value": "x\r\nB: y"}]}},
        "readinessProbe.httpGet.httpHeaders[0].value",
        "CR, LF",
    ),
    (
        "path with space",
        {"httpGet": {"port": 1, "path": "/a b"}},
        "readinessProbe.httpGet.path",
        "whitespace",
    ),
    (
        "host with path",
        {"tcpSocket": {"port": 1, "host": "a/b"}},
        "readinessProbe.tcpSocket.host",
        "not a host",
    ),
    (
        "command a string",
        {"exec": {"command": "/bin/true"}},
        "readinessProbe.exec.command",
        "expected a list",
    ),
    ("empty command", {"exec": {"command": []}}, "readinessProbe.exec.command", "required"),
    (
        "command arg not a string",
        {"exec": {"command": ["/bin/sleep", 1]}},
        "readinessProbe.exec.command[1]",
        "expected a string",
    ),
]


@pytest.mark.parametrize(
    ("raw", "field", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_specs_name_the_field(raw: Any, field: str, fragment: str) -> None:
    with pytest.raises(ProbeSpecError) as info:
        parse_probe(raw)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)


def test_error_path_uses_callers_prefix() -> None:
    with pytest.raises(ProbeSpecError) as info:
        parse_probe({"httpGet": {}}, where="mesh.yaml: defaultConfig.readinessProbe")
    assert (
        str(info.value)
        == "mesh.yaml: defaultConfig.readinessProbe.httpGet.port: is required (1-65535)"
    )
