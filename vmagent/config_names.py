"""Parsers for names and addresses passed on to other programs: raw string -> value, or
``ValueError`` saying what is allowed (the caller adds key and source).

A value vmagent only forwards (to Envoy's command line, into a SPIFFE ID, a CSR, a TLS name
check, a WorkloadEntry) fails far from its setting when it is wrong (Envoy exits 1 and is
restarted forever; istiod refuses the CSR), so each is checked at load against the rule of the
program that finally reads it. Pure functions.
"""

from __future__ import annotations

import ipaddress
import re

from vmagent.config_values import Parser, parse_list, split_host_port

# Envoy's levels: spdlog's level names plus "warn" (envoy source/server/options_impl.cc; checked
# against Envoy 1.40: `-l foo` exits 1 with "invalid log level specified 'foo'").
ENVOY_LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")
# Envoy's component (logger) names are lowercase identifiers ("upstream", "http2", "conn_handler").
_COMPONENT = re.compile(r"[a-z][a-z0-9_]*")


def envoy_log_level(raw: str) -> str:
    """Istio's ``--proxyLogLevel`` form: ``level[,component:level...]`` (``info,misc:error``),
    split as :func:`vmagent.envoy.bootstrap.split_log_level` does. Every level must be one of
    Envoy's; a component name must look like one (Envoy itself knows which exist)."""
    allowed = ", ".join(ENVOY_LOG_LEVELS)
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        pieces = part.split(":")
        if len(pieces) > 2:
            raise ValueError(f"{part!r}: expected LEVEL or COMPONENT:LEVEL")
        level = pieces[-1].strip()
        if level not in ENVOY_LOG_LEVELS:
            raise ValueError(f"{part!r}: Envoy's log levels are {allowed}")
        if len(pieces) == 2 and not _COMPONENT.fullmatch(pieces[0].strip()):
            raise ValueError(f"{part!r}: expected COMPONENT:LEVEL such as upstream:debug")
    return raw.strip()


# RFC 1123 label, as Kubernetes' IsDNS1123Label (namespaces) and IsDNS1123Subdomain (service
# account and most object names): lowercase alphanumerics and '-', 63 / 253 characters.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def dns1123_label(allow_empty: bool) -> Parser:
    """A Kubernetes namespace: ``my-ns`` (lowercase letters, digits, '-'; at most 63)."""

    def checked(raw: str) -> str:
        if (allow_empty and not raw) or _LABEL.fullmatch(raw):
            return raw
        raise ValueError(
            "expected a Kubernetes name such as my-ns: lowercase letters, digits and '-',"
            " starting and ending with a letter or digit, at most 63 characters"
        )

    return checked


def dns1123_subdomain(allow_empty: bool) -> Parser:
    """A Kubernetes object name (service account, workload name): dot-separated labels."""

    def checked(raw: str) -> str:
        if allow_empty and not raw:
            return raw
        if len(raw) <= 253 and all(_LABEL.fullmatch(p) for p in raw.split(".")):
            return raw
        raise ValueError(
            "expected a Kubernetes name such as my-app: lowercase letters, digits, '-' and"
            " '.', starting and ending with a letter or digit, at most 253 characters"
        )

    return checked


# Istio's pkg/spiffe: a trust domain is lowercase letters, digits, '.', '-', '_' (the SPIFFE
# spec's trust-domain charset); vmagent puts it into spiffe://TD/ns/NS/sa/SA.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")


def trust_domain(raw: str) -> str:
    """``TRUST_DOMAIN``: empty (what istioctl writes: the CA's is used) or a SPIFFE trust
    domain (SPIFFE-ID spec §2.1)."""
    if raw and not _TRUST_DOMAIN.fullmatch(raw):
        raise ValueError(
            "expected a SPIFFE trust domain such as cluster.local (lowercase letters, digits,"
            " '.', '-' and '_'), or empty"
        )
    return raw


_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?")


def is_hostname(host: str) -> bool:
    """A DNS name (labels of letters, digits, '-', '_'; a trailing dot allowed)."""
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(p) for p in name.split("."))


def hostname(allow_empty: bool) -> Parser:
    """A DNS name such as ``istiod.istio-system.svc`` (``ISTIOD_SAN``, the cluster domain)."""

    def checked(raw: str) -> str:
        if (allow_empty and not raw) or is_hostname(raw):
            return raw
        raise ValueError("expected a DNS name such as istiod.istio-system.svc")

    return checked


def domain_list(raw: str) -> tuple[str, ...]:
    """``VMAGENT_DNS_SEARCH``: search domains (comma/space-separated DNS names)."""
    items = parse_list(raw)
    for item in items:
        if not is_hostname(item):
            raise ValueError(f"{item!r}: expected domains such as ns1.svc.cluster.local")
    return items


def ip_list(raw: str) -> str:
    """``ISTIO_SVC_IP``: empty, or IP addresses separated by commas (kept as written)."""
    for item in (i.strip() for i in raw.split(",") if i.strip()):
        try:
            ipaddress.ip_address(item)
        except ValueError:
            raise ValueError(f"{item!r}: expected IP addresses such as 10.0.0.5") from None
    return raw


def check_server_address(text: str, require_port: bool) -> None:
    """``HOST:PORT`` of a server to dial: HOST a DNS name or an IP, an IPv6 address in
    brackets (``[fd00::1]:15012``). Raises ValueError saying which part is wrong."""
    stripped = text.strip()
    host, port = split_host_port(stripped, None)
    bracketed = stripped.startswith("[")
    if ":" in host and not bracketed:
        raise ValueError(f"{text!r}: expected HOST:PORT; write an IPv6 address as [ADDRESS]:PORT")
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
    elif not is_hostname(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is neither a DNS name nor an IP") from None
    if require_port and port is None:
        raise ValueError(f"expected HOST:PORT, got {text!r} (no port)")


def server_address(require_port: bool, allow_empty: bool) -> Parser:
    """:func:`check_server_address` as a setting parser (``CA_ADDR``)."""

    def checked(raw: str) -> str:
        if allow_empty and not raw.strip():
            return raw
        check_server_address(raw, require_port)
        return raw.strip()

    return checked
