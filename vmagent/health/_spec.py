"""Readiness-probe specification: Istio's ``ReadinessProbe`` as it appears in YAML/JSON.

Pure: no I/O. The same message appears as ``ProxyConfig.readinessProbe`` (``mesh.yaml``
``defaultConfig.readinessProbe``, written by ``istioctl x workload entry configure``) and as
``WorkloadGroup.spec.probe``. Istio decodes it with protojson, so both the camelCase JSON names and
the proto field names (``initial_delay_seconds``, ``http_get``) are accepted, and unknown keys are
an error rather than silently ignored (a typo such as ``periodSecond`` would otherwise quietly
become the 10 s default).

Defaults follow ``pkg/istio-agent/health/health_check.go`` (``fillInDefaults``): a zero threshold
becomes 1, a zero timeout 1 s, a zero period 10 s; the HTTP path defaults to ``/`` and the scheme
to ``http`` (lower-cased).

Default host: ``localhost`` for every probe kind, as Istio's agent does. Probing the workload's
own (possibly public) ``ISTIO_SVC_IP`` from the mesh source address 127.0.0.6 fails with
``connect: invalid argument`` when that IP is not assigned to a local interface (NAT'd cloud IPs),
which is why istioctl's onboarding sets ``REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION`` and Istio
settled on localhost (istio/istio#34407, istio/istio#34411). Set ``host`` explicitly to probe
another address.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "DEFAULT_HOST",
    "ExecAction",
    "GrpcAction",
    "HttpGetAction",
    "ProbeAction",
    "ProbeSpec",
    "ProbeSpecError",
    "TcpSocketAction",
    "parse_probe",
]

DEFAULT_HOST = "localhost"
_INT32_MAX = 2**31 - 1


class ProbeSpecError(ValueError):
    """A readiness probe that cannot be used; ``field`` is the dotted path of the bad key."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class HttpGetAction:
    """``httpGet``: GET ``scheme://host:port/path``; healthy iff the status is in [200, 400)."""

    port: int
    path: str = "/"
    host: str = DEFAULT_HOST
    scheme: Literal["http", "https"] = "http"
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


@dataclass(frozen=True)
class TcpSocketAction:
    """``tcpSocket``: healthy iff a TCP connection to ``host:port`` opens."""

    port: int
    host: str = DEFAULT_HOST


@dataclass(frozen=True)
class ExecAction:
    """``exec``: healthy iff ``command`` (argv, no shell) exits 0 within the timeout."""

    command: tuple[str, ...]


@dataclass(frozen=True)
class GrpcAction:
    """``grpc``: healthy iff ``grpc.health.v1.Health/Check`` for ``service`` returns SERVING."""

    port: int
    service: str = ""
    host: str = DEFAULT_HOST


ProbeAction: TypeAlias = HttpGetAction | TcpSocketAction | ExecAction | GrpcAction


@dataclass(frozen=True)
class ProbeSpec:
    """A readiness probe with Istio's defaults filled in.

    Durations are seconds. The parser yields whole seconds (Istio's fields are int32); the
    checker also accepts fractions, which tests use for short periods.
    """

    action: ProbeAction
    initial_delay_seconds: float = 0
    timeout_seconds: float = 1
    period_seconds: float = 10
    success_threshold: int = 1
    failure_threshold: int = 1

    @property
    def kind(self) -> str:
        """The probe kind as spelled in YAML: ``httpGet``, ``tcpSocket``, ``exec`` or ``grpc``."""
        return _KIND_NAMES[type(self.action)]


_KIND_NAMES: dict[type, str] = {
    HttpGetAction: "httpGet",
    TcpSocketAction: "tcpSocket",
    ExecAction: "exec",
    GrpcAction: "grpc",
}

# camelCase JSON name -> proto field name (protojson accepts either).
_PROBE_FIELDS = {
    "initialDelaySeconds": "initial_delay_seconds",
    "timeoutSeconds": "timeout_seconds",
    "periodSeconds": "period_seconds",
    "successThreshold": "success_threshold",
    "failureThreshold": "failure_threshold",
    "httpGet": "http_get",
    "tcpSocket": "tcp_socket",
    "exec": "exec",
    "grpc": "grpc",
}
_KINDS = ("httpGet", "tcpSocket", "exec", "grpc")
_HTTP_FIELDS = {
    "path": "path",
    "port": "port",
    "host": "host",
    "scheme": "scheme",
    "httpHeaders": "http_headers",
}
_TCP_FIELDS = {"host": "host", "port": "port"}
_EXEC_FIELDS = {"command": "command"}
_GRPC_FIELDS = {"port": "port", "service": "service"}
_HEADER_FIELDS = {"name": "name", "value": "value"}


def parse_probe(raw: object, *, where: str = "readinessProbe") -> ProbeSpec:
    """Parse a decoded YAML/JSON ``ReadinessProbe`` into a :class:`ProbeSpec`.

    ``where`` prefixes the field path in errors, e.g. ``"defaultConfig.readinessProbe"``.
    Raises :class:`ProbeSpecError` naming the offending field.
    """
    fields = _fields(raw, where, _PROBE_FIELDS)
    present = [kind for kind in _KINDS if kind in fields]
    if not present:
        raise ProbeSpecError(where, f"one of {', '.join(_KINDS)} is required")
    if len(present) > 1:
        raise ProbeSpecError(
            where, f"only one probe kind may be set, found {' and '.join(present)}"
        )
    kind = present[0]
    action = _ACTION_PARSERS[kind](fields[kind], f"{where}.{kind}")
    return ProbeSpec(
        action=action,
        initial_delay_seconds=_int(fields, "initialDelaySeconds", where),
        timeout_seconds=_int(fields, "timeoutSeconds", where) or 1,
        period_seconds=_int(fields, "periodSeconds", where) or 10,
        success_threshold=_int(fields, "successThreshold", where) or 1,
        failure_threshold=_int(fields, "failureThreshold", where) or 1,
    )


def _fields(raw: object, where: str, known: Mapping[str, str]) -> dict[str, object]:
    """The mapping's entries keyed by camelCase name; proto names are folded in."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ProbeSpecError(where, f"expected a mapping, got {_type_name(raw)}")
    by_proto = {proto: camel for camel, proto in known.items()}
    out: dict[str, object] = {}
    for key, value in raw.items():
        camel = key if key in known else by_proto.get(key) if isinstance(key, str) else None
        if camel is None:
            raise ProbeSpecError(
                f"{where}.{key}", f"unknown field (expected one of {', '.join(known)})"
            )
        if camel in out:
            raise ProbeSpecError(f"{where}.{camel}", "given twice (camelCase and proto name)")
        if value is not None:  # protojson: null means unset
            out[camel] = value
    return out


def _int(fields: Mapping[str, object], name: str, where: str, maximum: int = _INT32_MAX) -> int:
    value = fields.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProbeSpecError(f"{where}.{name}", f"expected an integer, got {_type_name(value)}")
    if value < 0:
        raise ProbeSpecError(f"{where}.{name}", f"must not be negative, got {value}")
    if value > maximum:
        raise ProbeSpecError(f"{where}.{name}", f"must be at most {maximum}, got {value}")
    return value


def _port(fields: Mapping[str, object], where: str) -> int:
    port = _int(fields, "port", where, maximum=65535)
    if port == 0:
        raise ProbeSpecError(f"{where}.port", "is required (1-65535)")
    return port


def _str(fields: Mapping[str, object], name: str, where: str) -> str:
    value = fields.get(name, "")
    if not isinstance(value, str):
        raise ProbeSpecError(f"{where}.{name}", f"expected a string, got {_type_name(value)}")
    if any(c in value for c in "\r\n\0"):
        raise ProbeSpecError(f"{where}.{name}", "must not contain CR, LF or NUL")
    return value


def _host(fields: Mapping[str, object], where: str) -> str:
    host = _str(fields, "host", where)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if any(c.isspace() or c in "/?#@" for c in host):
        raise ProbeSpecError(f"{where}.host", f"not a host name or address: {host!r}")
    return host or DEFAULT_HOST


def _http_get(raw: object, where: str) -> HttpGetAction:
    fields = _fields(raw, where, _HTTP_FIELDS)
    port = _port(fields, where)
    path = _str(fields, "path", where) or "/"
    if any(c.isspace() for c in path):
        raise ProbeSpecError(f"{where}.path", f"must not contain whitespace: {path!r}")
    if not path.startswith("/"):
        path = "/" + path
    scheme = (_str(fields, "scheme", where) or "http").lower()
    if scheme not in ("http", "https"):
        raise ProbeSpecError(f"{where}.scheme", f"must be HTTP or HTTPS, got {scheme!r}")
    return HttpGetAction(
        port=port,
        path=path,
        host=_host(fields, where),
        scheme="https" if scheme == "https" else "http",
        headers=_headers(fields.get("httpHeaders", []), f"{where}.httpHeaders"),
    )


def _headers(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list):
        raise ProbeSpecError(where, f"expected a list, got {_type_name(raw)}")
    headers = []
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        fields = _fields(item, here, _HEADER_FIELDS)
        name = _str(fields, "name", here)
        if not name or any(c.isspace() or c in ':()<>@,;\\"/[]?={}' for c in name):
            raise ProbeSpecError(f"{here}.name", f"not a valid header name: {name!r}")
        headers.append((name, _str(fields, "value", here)))
    return tuple(headers)


def _tcp_socket(raw: object, where: str) -> TcpSocketAction:
    fields = _fields(raw, where, _TCP_FIELDS)
    return TcpSocketAction(port=_port(fields, where), host=_host(fields, where))


def _exec(raw: object, where: str) -> ExecAction:
    fields = _fields(raw, where, _EXEC_FIELDS)
    command = fields.get("command", [])
    if not isinstance(command, list):
        raise ProbeSpecError(f"{where}.command", f"expected a list, got {_type_name(command)}")
    for i, arg in enumerate(command):
        if not isinstance(arg, str):
            raise ProbeSpecError(
                f"{where}.command[{i}]", f"expected a string, got {_type_name(arg)}"
            )
        if "\0" in arg:
            raise ProbeSpecError(f"{where}.command[{i}]", "must not contain NUL")
    if not command or not command[0]:
        raise ProbeSpecError(f"{where}.command", "is required (a non-empty argv list)")
    return ExecAction(command=tuple(command))


def _grpc(raw: object, where: str) -> GrpcAction:
    fields = _fields(raw, where, _GRPC_FIELDS)
    return GrpcAction(port=_port(fields, where), service=_str(fields, "service", where))


_ACTION_PARSERS: dict[str, Callable[[object, str], ProbeAction]] = {
    "httpGet": _http_get,
    "tcpSocket": _tcp_socket,
    "exec": _exec,
    "grpc": _grpc,
}


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return names.get(type(value), type(value).__name__)
