"""Rules between settings, and how an error names a setting (key and source, or the flag).

Pure: parsed values and their sources in, problem lines out. :func:`vmagent.config.load_config`
adds them to its one :class:`~vmagent.config_values.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from typing import Any

from vmagent.config_values import split_host_port

FLAG = "flag"  # the source of a command-line override (``flag --listen`` when its flag is known)


@dataclasses.dataclass(frozen=True)
class Names:
    """How messages name settings. ``sources``: key -> where its value came from (``env``,
    ``file:PATH``, ``flag --listen``, ...). ``flags``: key -> the running command's flag for
    it, with its metavar (``--listen HOST:PORT``, ``--allow-non-loopback``)."""

    sources: Mapping[str, str]
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def value(self, key: str, raw: Any) -> str:
        """``KEY='raw' (from SOURCE)``, or ``--flag 'raw'`` when a flag gave it."""
        shown = raw if isinstance(raw, str) else f"{raw:g}" if isinstance(raw, float) else raw
        origin = self.sources.get(key, "default")
        if origin.startswith(f"{FLAG} --"):
            return f"{origin.removeprefix(FLAG).strip()} {str(shown)!r}"
        return f"{key}={str(shown)!r} (from {origin})"

    def how_to_set(self, key: str, example: str) -> str:
        """How to change ``key`` in this command: its flag, else ``KEY=example``."""
        return self.flags.get(key) or f"{key}={example}"

    def move_hint(self, key: str, example: str = "HOST:PORT") -> str:
        """For a port in use: "stop the process that holds it or move it with ..."."""
        flag = self.flags.get(key)
        where = flag if flag else f"{key}={example}"
        return f"stop the process that holds it or move it with {where}"


def flag_source(key: str, flags: Mapping[str, str]) -> str:
    """The source label of an override: ``flag --listen`` (the flag's first word), else
    ``flag``."""
    spelled = flags.get(key, "").split()
    return f"{FLAG} {spelled[0]}" if spelled else FLAG


def cross_checks(values: Mapping[str, Any], names: Names, document: Mapping[str, Any]) -> list[str]:
    """Every rule between settings; ``document`` is the merged ProxyConfig (for
    ``proxyAdminPort``)."""
    return _non_loopback_dns(values, names) + _port_collisions(values, names, document)


def _non_loopback_dns(values: Mapping[str, Any], names: Names) -> list[str]:
    # The DNS proxy answers mesh names to anyone who can reach it: loopback unless allowed.
    if values.get("vmagent_dns_allow_non_loopback", False):
        return []
    problems = []
    for item in values.get("dns_proxy_addr", ()):
        host, _ = split_host_port(item, None)
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            allow = names.how_to_set("VMAGENT_DNS_ALLOW_NON_LOOPBACK", "true")
            problems.append(
                f"{names.value('DNS_PROXY_ADDR', item)}: not a loopback address; serving DNS"
                f" beyond this host needs {allow}"
            )
    return problems


# (what, key, host, port); host None: every address (Envoy's listeners bind the wildcard).
_Listener = tuple[str, str, "str | None", int]
ISTIO_OUTBOUND_CAPTURE_PORT = 15001  # Envoy's virtualOutbound listener (iptables REDIRECT)


def listeners(values: Mapping[str, Any], document: Mapping[str, Any]) -> list[_Listener]:
    """The TCP ports one agent listens on: its status endpoint, DNS (UDP and TCP), and with
    Envoy its admin (``proxyAdminPort``), readiness, Prometheus and, when capture is
    configured, the inbound (``INBOUND_CAPTURE_PORT``) and outbound (15001) capture ports."""
    found: list[_Listener] = []
    host, port = split_host_port(values.get("vmagent_status_addr", "127.0.0.1:15020"), 15020)
    found.append(("status endpoint", "VMAGENT_STATUS_ADDR", host, port or 15020))
    for item in values.get("dns_proxy_addr", ("localhost:15053",)):
        host, port = split_host_port(item, 53)
        found.append(("DNS proxy", "DNS_PROXY_ADDR", host, port or 53))
    if not values.get("vmagent_envoy", True):
        return found
    admin = document.get("proxyAdminPort")
    admin_port = int(admin) if isinstance(admin, (int, str)) and str(admin).isdigit() else 0
    found.append(("Envoy admin", "proxyAdminPort", "127.0.0.1", admin_port or 15000))
    for what, key, default in (
        ("Envoy readiness", "VMAGENT_ENVOY_READINESS_PORT", 15021),
        ("Envoy Prometheus", "VMAGENT_ENVOY_PROMETHEUS_PORT", 15090),
    ):
        found.append((what, key, None, int(values.get(key.lower(), default))))
    if values.get("istio_inbound_ports"):
        port = int(values.get("inbound_capture_port", 15006))
        found.append(("Envoy inbound capture", "INBOUND_CAPTURE_PORT", None, port))
    if values.get("istio_service_cidr") or values.get("istio_outbound_ports"):
        found.append(("Envoy outbound capture", "", None, ISTIO_OUTBOUND_CAPTURE_PORT))
    return found


def _overlap(a: str | None, b: str | None) -> bool:
    """Whether two listen hosts can clash on one port (``localhost`` is 127.0.0.1 and ::1)."""
    if a is None or b is None or a == b:
        return True
    hosts = []
    for host in (a, b):
        if host == "localhost":
            hosts.append({"127.0.0.1", "::1"})
            continue
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return True  # a name: cannot tell, assume it may
        if address.is_unspecified:
            return True
        hosts.append({str(address)})
    return bool(hosts[0] & hosts[1])


def _port_collisions(
    values: Mapping[str, Any], names: Names, document: Mapping[str, Any]
) -> list[str]:
    """Two listeners of one agent on one port: one of them would fail to bind (Envoy's only
    logs it and never gets ready; the status endpoint would answer for Envoy)."""
    found = listeners(values, document)
    problems = []
    for i, (what_a, key_a, host_a, port_a) in enumerate(found):
        for what_b, key_b, host_b, port_b in found[i + 1 :]:
            if port_a != port_b or key_a == key_b or not _overlap(host_a, host_b):
                continue
            problems.append(
                f"port {port_a} is used twice: {what_a} ({_named(names, key_a)}) and {what_b}"
                f" ({_named(names, key_b)}); the ports of one agent must differ: move one"
            )
    return problems


def _named(names: Names, key: str) -> str:
    if not key:
        return "fixed by Istio"
    if key == "proxyAdminPort":
        return "ProxyConfig proxyAdminPort"
    return f"{key}, from {names.sources.get(key, 'default')}"
