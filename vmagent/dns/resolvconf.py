"""resolv.conf and address parsing (pure)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

Address = tuple[str, int]


@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()


def parse_resolv_conf(text: str) -> ResolvConf:
    """Nameservers and the search list, as glibc reads them (the last search/domain wins)."""
    servers: list[str] = []
    search: tuple[str, ...] = ()
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2:
            continue
        if words[0] == "nameserver":
            try:
                ipaddress.ip_address(words[1].split("%", 1)[0])
            except ValueError:
                continue
            servers.append(words[1])
        elif words[0] == "search":
            search = tuple(words[1:])
        elif words[0] == "domain":
            search = (words[1],)
    return ResolvConf(tuple(servers), search)


def parse_host_port(text: str, default_port: int) -> Address:
    """``1.2.3.4``, ``1.2.3.4:53``, ``::1``, ``[::1]:53``, ``localhost:15053``."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}")
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, text)
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {whole!r}")
    return int(text)


def listen_addresses(specs: tuple[str, ...], allow_non_loopback: bool) -> list[Address]:
    """Expand listen specs; ``localhost`` means 127.0.0.1 and ::1 (like Istio's agent)."""
    out: list[Address] = []
    for spec in specs:
        host, port = parse_host_port(spec, 15053)
        hosts = ["127.0.0.1", "::1"] if host == "localhost" else [host]
        for one in hosts:
            try:
                address = ipaddress.ip_address(one)
            except ValueError:
                raise ValueError(f"listen address {spec!r}: expected an IP or localhost") from None
            if not address.is_loopback and not allow_non_loopback:
                raise ValueError(
                    f"listen address {spec!r} is not loopback; serving DNS beyond this host "
                    "needs --allow-non-loopback (VMAGENT_DNS_ALLOW_NON_LOOPBACK=true)"
                )
            out.append((one, port))
    return list(dict.fromkeys(out))
