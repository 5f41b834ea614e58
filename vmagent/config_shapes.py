"""What a setting accepts, in words, read from the parser that checks it.

Every setting of :class:`vmagent.config.Config` is declared with a parser from
:mod:`vmagent.config_values` or :mod:`vmagent.config_names`; most are closures made by a
factory (``in_range(parse_int, 1, 65535)``). :func:`describe` finds the factory by the
closure's ``__qualname__`` and reads its bounds and choices from the closure's cells, so the
reference states exactly the range the loader enforces. A parser with no describer here is a
:class:`LookupError` naming it (the reference test then fails: describe the new parser).
Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vmagent import config_names as names
from vmagent import config_values as values

Parser = Callable[[str], Any]
LIST = "comma- or space-separated list of "


def cells(parser: Parser) -> dict[str, Any]:
    """The closure variables of ``parser`` by name (empty for a plain function)."""
    code = getattr(parser, "__code__", None)
    closure = getattr(parser, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, closure)}


def _number(bound: float, unit: str) -> str:
    if unit == "s":
        return values.format_seconds(bound)
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _in_range(c: Mapping[str, Any]) -> str:
    unit = cells(c["show"]).get("unit", "") if "show" in c else ""  # show() holds the unit
    return f"{describe(c['parse'])}, {_number(c['low'], unit)} to {_number(c['high'], unit)}"


def _exclusive(c: Mapping[str, Any]) -> str:
    low = ">" if c["low_open"] else "≥"
    high = "<" if c["high_open"] else "≤"
    return f"{describe(c['parse'])} {low} {c['low']:g} and {high} {c['high']:g}"


def _one_of(c: Mapping[str, Any]) -> str:
    shown = ", ".join(f"`{choice}`" if choice else "empty" for choice in c["allowed"])
    case = " (any case)" if c.get("ignore_case", True) else ""
    return f"one of {shown}{case}"


def _or_empty(text: str, c: Mapping[str, Any]) -> str:
    return text + (", or empty" if c.get("allow_empty") else "")


def _ports(c: Mapping[str, Any]) -> str:
    return LIST + "ports 1-65535" + (", or `*` (every port)" if c["wildcard"] else "")


def _cidrs(c: Mapping[str, Any]) -> str:
    text = LIST + "IP ranges (`10.96.0.0/12`; an address alone is /32 or /128)"
    return text + (", or `*` (everything)" if c["wildcard"] else "")


def _addresses(c: Mapping[str, Any]) -> str:
    host = "IP or `localhost`" if c["require_ip"] else "HOST"
    return LIST + f"`ADDRESS[:PORT]` (ADDRESS an {host}; IPv6 as `[ADDRESS]:PORT`)"


def _host_port(c: Mapping[str, Any]) -> str:
    text = "`HOST:PORT`, port 1-65535" if c["require_port"] else "`HOST[:PORT]`"
    return _or_empty(text, c)


def _server(c: Mapping[str, Any]) -> str:
    text = "`HOST:PORT` (HOST a DNS name or IP; IPv6 as `[ADDRESS]:PORT`)"
    if not c["require_port"]:
        text = "`HOST[:PORT]` (HOST a DNS name or IP; IPv6 in brackets)"
    return _or_empty(text, c)


def _secret_ttl(_: Mapping[str, Any]) -> str:
    # Bounds of config_values._secret_ttl; tests/test_config_reference.py probes both ends.
    return f"duration, {values.format_seconds(values.MIN_SECRET_TTL)} to 8760h"


_LEVELS = ", ".join(f"`{level}`" for level in names.ENVOY_LOG_LEVELS)

# Factory closures by qualname -> text from their cells.
_FACTORIES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "in_range.<locals>.checked": _in_range,
    "exclusive_range.<locals>.checked": _exclusive,
    "non_negative.<locals>.checked": lambda c: f"{describe(c['parse'])}, not negative",
    "one_of.<locals>.checked": _one_of,
    "host_port.<locals>.checked": _host_port,
    "address_list.<locals>.checked": _addresses,
    "port_list.<locals>.checked": _ports,
    "cidr_list.<locals>.checked": _cidrs,
    "dns1123_label.<locals>.checked": lambda c: _or_empty(
        "Kubernetes name (RFC 1123 label: lowercase letters, digits, `-`; at most 63)", c
    ),
    "dns1123_subdomain.<locals>.checked": lambda c: _or_empty(
        "Kubernetes object name (RFC 1123 subdomain: lowercase letters, digits, `-`, `.`;"
        " at most 253)",
        c,
    ),
    "hostname.<locals>.checked": lambda c: _or_empty("DNS name", c),
    "server_address.<locals>.checked": _server,
}

# Plain functions.
_FUNCTIONS: dict[Parser, str] = {
    values.parse_str: "text",
    values.parse_bool: "boolean",
    values.parse_int: "whole number",
    values.parse_float: "number",
    values.parse_duration: "duration",
    values.id_list: LIST + "numeric ids (`1337`)",
    values.url: "`http://` or `https://` URL, or empty",
    values.metadata_host: "`HOST[:PORT]`, or an `http://` / `https://` URL",
    values.SECRET_TTL_RANGE: "",  # see _secret_ttl (it has no closure to read)
    names.envoy_log_level: f"`LEVEL[,COMPONENT:LEVEL...]`, levels {_LEVELS}",
    names.trust_domain: "SPIFFE trust domain (lowercase letters, digits, `.`, `-`, `_`), or empty",
    names.domain_list: LIST + "DNS names",
    names.ip_list: "comma-separated IP addresses, or empty",
}


def describe(parser: Parser) -> str:
    """The values ``parser`` accepts, as a short markdown phrase. LookupError for a parser
    this module does not know."""
    if parser is values.SECRET_TTL_RANGE:
        return _secret_ttl({})
    text = _FUNCTIONS.get(parser)
    if text:
        return text
    factory = _FACTORIES.get(getattr(parser, "__qualname__", ""))
    if factory is None:
        raise LookupError(
            f"no description of the setting parser {getattr(parser, '__qualname__', parser)!r}:"
            " add one to vmagent/config_shapes.py"
        )
    return factory(cells(parser))
