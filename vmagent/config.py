"""The agent's one immutable configuration object.

Every setting is declared once, as a field of :class:`Config`, under the environment name Istio
uses for it (``cluster.env`` as ``istioctl x workload entry configure`` writes it), or a
``VMAGENT_`` name where Istio has none. Sources, highest first: command-line overrides, the
process environment, the ``cluster.env`` file, the field's default.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vmagent.proxyconfig import (
    ProxyConfig,
    ProxyConfigError,
    merge,
    parse_mesh_config,
    parse_proxy_config_env,
)

DEFAULT_CLUSTER_ENV = "/etc/vmagent/cluster.env"
CLUSTER_ENV_VAR = "VMAGENT_CLUSTER_ENV"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the key and its source."""


# --- value parsers: raw string -> typed value, ValueError with a short reason on failure ---

_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(raw: str) -> bool:
    """Go's strconv.ParseBool, which is what Istio uses for its boolean variables."""
    if raw in _GO_TRUE:
        return True
    if raw in _GO_FALSE:
        return False
    raise ValueError("expected a boolean (true/false/1/0)")


def parse_int(raw: str) -> int:
    try:
        return int(raw.strip(), 10)
    except ValueError:
        raise ValueError("expected a whole number") from None


def non_negative(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def checked(raw: str) -> Any:
        value = parse(raw)
        if value < 0:
            raise ValueError("must not be negative")
        return value

    return checked


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(raw: str) -> float:
    """A Go duration ("5s", "1m30s", "24h0m0s") or a bare number of seconds; returns seconds."""
    text = raw.strip()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError("expected a duration such as 5s, 1m30s or 24h") from None
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_list(raw: str) -> tuple[str, ...]:
    """A comma- or space-separated list; empty items are dropped."""
    return tuple(item for item in re.split(r"[,\s]+", raw.strip()) if item)


def parse_float(raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise ValueError("expected a number") from None


def parse_str(raw: str) -> str:
    return raw


def _setting(
    default: str, help: str, parse: Callable[[str], Any] = parse_str, env: str | None = None
) -> Any:
    """Declare a setting; ``default`` is given as the raw string a user would write."""
    return dataclasses.field(
        default=parse(default), metadata={"parse": parse, "env": env, "help": help, "raw": default}
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """Effective settings. Field ``foo_bar`` is read from variable ``FOO_BAR``."""

    # Workload identity, as Istio's cluster.env names it.
    pod_namespace: str = _setting("", "workload namespace (falls back to ISTIO_NAMESPACE)")
    istio_namespace: str = _setting("", "namespace from istioctl's cluster.env")
    service_account: str = _setting("default", "Kubernetes service account of the workload")
    trust_domain: str = _setting("cluster.local", "SPIFFE trust domain (may be set empty)")
    istio_meta_cluster_id: str = _setting("", "cluster ID sent to the CA and control plane")
    istio_svc_ip: str = _setting("", "the workload's IP address")
    ca_addr: str = _setting("", "mesh CA address (default: the discovery address)")
    istiod_san: str = _setting("", "TLS server name expected from istiod")

    # Local paths.
    vmagent_config_dir: str = _setting("/etc/vmagent", "configuration directory")
    vmagent_state_dir: str = _setting("/var/lib/vmagent", "persistent state directory")
    vmagent_run_dir: str = _setting("/run/vmagent", "runtime directory (sockets)")
    vmagent_status_addr: str = _setting("127.0.0.1:15020", "local status endpoint")

    # DNS proxy.
    istio_meta_dns_capture: bool = _setting("false", "capture the host's DNS", parse_bool)
    dns_proxy_addr: tuple[str, ...] = _setting(
        "localhost:15053", "DNS listen addresses (localhost = 127.0.0.1 and ::1)", parse_list
    )
    dns_forward_parallel: bool = _setting("false", "ask all upstreams at once", parse_bool)
    dns_forward_timeout: float = _setting(
        "5s", "total budget for one upstream query", parse_duration
    )
    vmagent_dns_attempt_timeout: float = _setting(
        "2s", "timeout for one upstream server attempt", parse_duration
    )
    vmagent_dns_upstreams: tuple[str, ...] = _setting(
        "", "upstream servers HOST[:PORT] (default: resolv.conf nameservers)", parse_list
    )
    vmagent_resolv_conf: str = _setting("/etc/resolv.conf", "resolv.conf to take upstreams from")
    vmagent_dns_search: tuple[str, ...] = _setting(
        "", "search domains (default: resolv.conf's)", parse_list
    )
    vmagent_cluster_domain: str = _setting("cluster.local", "Kubernetes cluster domain")
    vmagent_dns_ttl: int = _setting(
        "30", "TTL of answers from the name table", non_negative(parse_int)
    )
    vmagent_dns_cache_max_ttl: int = _setting(
        "300", "cap on the TTL of cached upstream answers", non_negative(parse_int)
    )
    vmagent_dns_cache_negative_ttl: int = _setting(
        "60", "cap on the TTL of cached NXDOMAIN/NODATA", non_negative(parse_int)
    )
    vmagent_dns_cache_entries: int = _setting(
        "10000", "cache size in entries", non_negative(parse_int)
    )
    vmagent_dns_cache_bytes: int = _setting(
        "16777216", "cache size in bytes of answers", non_negative(parse_int)
    )
    vmagent_dns_stale_seconds: int = _setting(
        "3600", "how long after expiry an answer may be served stale", non_negative(parse_int)
    )
    vmagent_dns_tcp_idle_timeout: float = _setting(
        "10s", "idle TCP connection timeout", parse_duration
    )
    vmagent_dns_tcp_max_connections: int = _setting(
        "256", "concurrent DNS TCP connections", non_negative(parse_int)
    )
    vmagent_dns_allow_non_loopback: bool = _setting(
        "false", "allow listening on non-loopback addresses", parse_bool
    )

    # Identity: platform credential, CSR, CA client, certificate files (Istio's names).
    credential_fetcher_type: str = _setting(
        "auto", "credential source: auto, JWT, GoogleComputeEngine, AWS, Azure"
    )
    vmagent_token_file: str = _setting("/etc/vmagent/istio-token", "bootstrap token file (JWT)")
    gce_metadata_host: str = _setting("169.254.169.254", "GCE metadata server host[:port]")
    aws_ec2_metadata_service_endpoint: str = _setting("", "AWS IMDS endpoint URL")
    aws_ec2_metadata_service_endpoint_mode: str = _setting(
        "IPv4", "AWS IMDS endpoint: IPv4 or IPv6"
    )
    vmagent_azure_metadata_endpoint: str = _setting(
        "http://169.254.169.254", "Azure instance metadata endpoint URL"
    )
    vmagent_dmi_root: str = _setting("/sys/class/dmi/id", "DMI directory for cloud detection")
    ecc_signature_algorithm: str = _setting(
        "ECDSA", "workload key: ECDSA, or RSA when set to RSA/empty"
    )
    ecc_curve: str = _setting("P256", "ECDSA curve: P256 or P384")
    workload_rsa_key_size: int = _setting("2048", "RSA key size (>= 2048)", non_negative(parse_int))
    secret_ttl: float = _setting("24h", "requested certificate lifetime", parse_duration)
    secret_grace_period_ratio: float = _setting(
        "0.5", "rotate at this fraction of lifetime", parse_float
    )
    secret_grace_period_ratio_jitter: float = _setting(
        "0.01", "jitter of the rotation ratio", parse_float
    )
    ca_root_ca: str = _setting("", "root cert to verify the CA (SYSTEM = OS trust store)")
    xds_root_ca: str = _setting("", "root cert to verify istiod (SYSTEM = OS trust store)")
    output_certs: str = _setting(
        "/var/lib/vmagent/certs", "where key.pem/cert-chain.pem/root-cert.pem live"
    )
    istio_meta_cert_signer: str = _setting("", "CertSigner metadata sent with the CSR")

    vmagent_mesh_config: str = _setting(
        "", "mesh.yaml from istioctl (default: <VMAGENT_CONFIG_DIR>/mesh.yaml, if present)"
    )
    proxy_config_env: str = _setting("", "ProxyConfig YAML laid over mesh.yaml", env="PROXY_CONFIG")

    # Where each value came from: env key -> "flag", "env", "file:PATH", "mesh:PATH", "default".
    sources: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )
    # Keys Istio reads by prefix (ISTIO_META_*, ISTIO_METAJSON_*, CA_HEADER_*, XDS_HEADER_*).
    dynamic: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )
    proxy_config: ProxyConfig = dataclasses.field(
        default_factory=ProxyConfig, compare=False, repr=False
    )

    @property
    def namespace(self) -> str:
        """The workload namespace the way istio-start.sh derives it."""
        return self.pod_namespace or self.istio_namespace or "default"

    @property
    def ca_address(self) -> str:
        return self.ca_addr or "istiod.istio-system.svc:15012"


def env_key(field: dataclasses.Field[Any]) -> str:
    return str(field.metadata.get("env") or field.name.upper())


def settings() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(Config) if "parse" in f.metadata]


def parse_env_file(text: str, origin: str) -> dict[str, str]:
    """Parse ``KEY='value'`` lines (istioctl's cluster.env, also ``export KEY=value``)."""
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        key, sep, rest = stripped.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{origin}:{lineno}: expected KEY=value, got {line!r}")
        try:
            words = shlex.split(rest, comments=True)
        except ValueError as exc:
            raise ConfigError(f"{origin}:{lineno}: {key}: bad quoting ({exc})") from None
        values[key] = " ".join(words)
    return values


DYNAMIC_PREFIXES = ("ISTIO_META_", "ISTIO_METAJSON_", "CA_HEADER_", "XDS_HEADER_")


def _read_optional(path: Path, explicit: bool, what: str) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: {what} not found") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from None


def load_config(
    environ: Mapping[str, str],
    overrides: Mapping[str, str] | None = None,
    cluster_env: str | Path | None = None,
) -> Config:
    """Build the effective config. ``cluster_env`` None means: ``$VMAGENT_CLUSTER_ENV`` or the
    default path, read only if it exists; an explicitly given path must exist. mesh.yaml's
    ``proxyMetadata`` (and PROXY_CONFIG's) sit below cluster.env, above the defaults."""
    overrides = overrides or {}
    path = Path(cluster_env or environ.get(CLUSTER_ENV_VAR) or DEFAULT_CLUSTER_ENV)
    explicit = cluster_env is not None or CLUSTER_ENV_VAR in environ
    text = _read_optional(path, explicit, "cluster.env file")
    file_values = parse_env_file(text, str(path)) if text is not None else {}
    layers: list[tuple[str, Mapping[str, str]]] = [
        ("flag", overrides),
        ("env", environ),
        (f"file:{path}", file_values),
    ]

    def first(key: str, default: str) -> str:
        return next((layer[key] for _, layer in layers if key in layer), default)

    mesh_name = first("VMAGENT_MESH_CONFIG", "")
    mesh_path = Path(mesh_name or Path(first("VMAGENT_CONFIG_DIR", "/etc/vmagent")) / "mesh.yaml")
    try:
        mesh_text = _read_optional(mesh_path, bool(mesh_name), "mesh config")
        base = parse_mesh_config(mesh_text, str(mesh_path)) if mesh_text is not None else {}
        proxy_config = merge(base, parse_proxy_config_env(first("PROXY_CONFIG", "")))
    except ProxyConfigError as exc:
        raise ConfigError(str(exc)) from None
    layers.append((f"mesh:{mesh_path}", proxy_config.proxy_metadata))

    dynamic: dict[str, str] = {}
    for _, layer in reversed(layers):
        dynamic.update((k, v) for k, v in layer.items() if k.startswith(DYNAMIC_PREFIXES))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field in settings():
        key = env_key(field)
        for origin, layer in layers:
            if key in layer:
                raw = layer[key]
                try:
                    values[field.name] = field.metadata["parse"](raw)
                except ValueError as exc:
                    raise ConfigError(f"{key}={raw!r} (from {origin}): {exc}") from None
                sources[key] = origin
                break
        else:
            sources[key] = "default"
    return Config(
        **values,
        sources=MappingProxyType(sources),
        dynamic=MappingProxyType(dynamic),
        proxy_config=proxy_config,
    )


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}s"
    return str(value)


def describe(config: Config) -> list[tuple[str, str, str]]:
    """(key, effective value, source) for every setting, for ``vmagent config show``."""
    return [
        (
            env_key(f),
            format_value(getattr(config, f.name)),
            config.sources.get(env_key(f), "default"),
        )
        for f in settings()
    ]
