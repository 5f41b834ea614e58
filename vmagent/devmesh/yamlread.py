"""Typed readers for the devmesh YAML config; ``where`` is the key path that error messages
name (``services[2].ports[0].port``)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any


class ConfigFileError(ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""


def read_fail(where: str, problem: str) -> ConfigFileError:
    return ConfigFileError(f"{where}: {problem}")


def read_mapping(value: Any, where: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise read_fail(where, f"expected a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise read_fail(f"{where}.{unknown[0]}", f"unknown key (allowed: {', '.join(allowed)})")
    return value


def read_string(value: Any, where: str, default: str | None = None) -> str:
    if value is None:
        if default is None:
            raise read_fail(where, "required")
        return default
    if not isinstance(value, str) or not value:
        raise read_fail(where, f"expected a non-empty string, got {value!r}")
    return value


def read_integer(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise read_fail(where, f"expected an integer {low}-{high}, got {value!r}")
    return value


def read_labels(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise read_fail(where, "expected a mapping of strings")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, (str, int, float, bool)):
            raise read_fail(f"{where}.{key}", f"expected a string value, got {item!r}")
        out[key] = str(item).lower() if isinstance(item, bool) else str(item)
    return out


def read_list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise read_fail(where, f"expected a list, got {type(value).__name__}")
    return value


def read_address(value: Any, where: str, cidr: bool) -> str:
    text = read_string(value, where)
    try:
        if cidr and "/" in text:
            ipaddress.ip_network(text, strict=False)
        else:
            ipaddress.ip_address(text)
    except ValueError:
        kind = "an IP address or CIDR" if cidr else "an IP address"
        raise read_fail(where, f"expected {kind}, got {text!r}") from None
    return text


def read_host(value: Any, where: str) -> str:
    host = read_string(value, where).lower().rstrip(".")
    labels = host.split(".")
    if any(not label for label in labels) or any(
        not all(c.isalnum() or c == "-" for c in label) for label in labels[1:]
    ):
        raise read_fail(
            where, f"expected a DNS name (optionally starting with '*.'), got {value!r}"
        )
    first = labels[0]
    if first != "*" and not all(c.isalnum() or c == "-" for c in first):
        raise read_fail(
            where, f"expected a DNS name (optionally starting with '*.'), got {value!r}"
        )
    return host


def read_labels_raw(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise read_fail(where, "expected a mapping")
    return value
