"""Setting value parsers: raw string -> typed value, ``ValueError`` with a short reason.

Pure functions, used by :mod:`vmagent.config` to declare every setting's type *and* its allowed
range, so a value that cannot work (``SECRET_GRACE_PERIOD_RATIO=7``, a port of 70000, a
credential source nobody implements) is refused when the configuration is loaded instead of
misbehaving later. The reason strings name the allowed values; the caller adds key and source.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # config_paths raises this module's ConfigError: no import cycle at run time
    from vmagent.config_paths import FoundFile

Parser = Callable[[str], Any]


class ConfigError(ValueError):
    """Permanent misconfiguration: a setting or file that cannot work, whatever is retried.

    The message names the key and its source. Raised at load for everything that can be
    checked there; a part of the running agent raises it for what can only be found later, and
    the supervisor then stops the agent instead of restarting the part (``vmagent run`` exits
    2). Transient failures (network, CA down) must use other exception types."""


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


def parse_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(raw: str) -> float:
    """A Go duration ("5s", "1m30s", "24h0m0s") or a bare number of seconds; returns seconds."""
    text = raw.strip()
    try:
        seconds = parse_float(text)
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


def parse_str(raw: str) -> str:
    return raw


def non_negative(parse: Parser) -> Parser:
    def checked(raw: str) -> Any:
        value = parse(raw)
        if value < 0:
            raise ValueError("must not be negative")
        return value

    return checked


def format_seconds(seconds: float) -> str:
    """``90`` -> ``1m30s``, ``0.25`` -> ``250ms``, ``86400`` -> ``24h``: how Go prints them."""
    if seconds < 1 and seconds > 0:
        return f"{seconds * 1000:g}ms"
    parts = []
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        parts.append(f"{hours:g}h")
    if minutes:
        parts.append(f"{minutes:g}m")
    if secs or not parts:
        parts.append(f"{round(secs, 6):g}s")
    return "".join(parts)


def in_range(parse: Parser, low: float, high: float, unit: str = "") -> Parser:
    """``parse`` then require ``low <= value <= high`` ("must be between 1s and 90 days").
    ``unit`` "s" prints the bounds as durations."""

    def show(bound: float) -> str:
        return format_seconds(bound) if unit == "s" else f"{bound:g}"

    def checked(raw: str) -> Any:
        value = parse(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {show(low)} and {show(high)}")
        return value

    return checked


def exclusive_range(
    parse: Parser, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Parser:
    """``parse`` then require ``low < value < high`` (``<=`` at a closed end): "must be
    between 0 and 1, not 0 or 1"."""

    def checked(raw: str) -> Any:
        value = parse(raw)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            ends = [f"{b:g}" for b, is_open in ((low, low_open), (high, high_open)) if is_open]
            raise ValueError(f"must be between {low:g} and {high:g}, not {' or '.join(ends)}")
        return value

    return checked


def format_value(value: Any, unit: str = "") -> str:
    """How ``config show`` prints a value: durations as ``5s``, ratios and counts as numbers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return format_seconds(value) if unit == "s" else f"{value:g}"
    return str(value)


def one_of(choices: Iterable[str], ignore_case: bool = True) -> Parser:
    """A string that must be one of ``choices`` (kept as written; compared ignoring case)."""
    allowed = tuple(choices)
    folded = {c.lower() if ignore_case else c for c in allowed}

    def checked(raw: str) -> str:
        key = raw.strip()
        if (key.lower() if ignore_case else key) not in folded:
            shown = ", ".join(c if c else repr(c) for c in allowed)
            raise ValueError(f"expected one of {shown}")
        return raw

    return checked


def split_host_port(text: str, default_port: int | None) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address; the port 1..65535."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
        if rest and not port_text:
            raise ValueError(f"bad address {text!r}: empty port")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text:
            raise ValueError(f"bad address {text!r}: empty port")
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}: must be between 1 and 65535")
    return host, int(port_text)


def host_port(require_port: bool, allow_empty: bool = False) -> Parser:
    """An address ``HOST:PORT`` (or ``HOST[:PORT]`` when the port is optional)."""

    def checked(raw: str) -> str:
        if not raw.strip():
            if allow_empty:
                return raw
            raise ValueError("expected HOST:PORT")
        _, port = split_host_port(raw, None)
        if require_port and port is None:
            raise ValueError(f"expected HOST:PORT, got {raw!r} (no port)")
        return raw.strip()

    return checked


def address_list(require_ip: bool) -> Parser:
    """A list of ``HOST[:PORT]``; with ``require_ip`` each host is an IP or ``localhost``."""

    def checked(raw: str) -> tuple[str, ...]:
        items = parse_list(raw)
        for item in items:
            host, _ = split_host_port(item, None)
            if require_ip and host != "localhost":
                try:
                    ipaddress.ip_address(host)
                except ValueError:
                    raise ValueError(f"{item!r}: expected an IP address or localhost") from None
        return items

    return checked


def port_list(wildcard: bool) -> Parser:
    """Comma/space-separated ports 1..65535 (as strings), or ``*`` when ``wildcard``: Istio's
    ISTIO_INBOUND_PORTS and friends (tools/istio-iptables/pkg/cmd/root.go)."""

    def checked(raw: str) -> tuple[str, ...]:
        items = parse_list(raw)
        if items == ("*",) and wildcard:
            return items
        if wildcard and "*" in items:
            raise ValueError('"*" (every port) cannot be combined with ports')
        for item in items:
            if not item.isdigit() or not 0 < int(item) < 65536:
                allowed = "ports 1-65535" + (' or "*"' if wildcard else "")
                raise ValueError(f"{item!r}: expected {allowed}")
        return tuple(str(int(item)) for item in items)

    return checked


def cidr_list(wildcard: bool) -> Parser:
    """Comma/space-separated CIDRs (a bare address is /32 or /128), or ``*`` when
    ``wildcard``: ISTIO_SERVICE_CIDR, ISTIO_SERVICE_EXCLUDE_CIDR."""

    def checked(raw: str) -> tuple[str, ...]:
        items = parse_list(raw)
        if items == ("*",) and wildcard:
            return items
        if wildcard and "*" in items:
            raise ValueError('"*" (everything) cannot be combined with ranges')
        found = []
        for item in items:
            try:
                found.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                allowed = "IP ranges such as 10.96.0.0/12" + (' or "*"' if wildcard else "")
                raise ValueError(f"{item!r}: expected {allowed}") from None
        return tuple(found)

    return checked


def id_list(raw: str) -> tuple[str, ...]:
    """PROXY_UID/PROXY_GID: comma-separated numeric ids (empty: decided at capture time)."""
    items = parse_list(raw)
    if not all(item.isdigit() and int(item) < 2**32 - 1 for item in items):
        raise ValueError("expected numeric ids such as 1337 or 1337,1338 (for a user: id -u NAME)")
    return tuple(str(int(item)) for item in items)


def url(raw: str) -> str:
    """Empty, or an ``http://`` / ``https://`` URL with a host."""
    text = raw.strip()
    if text and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", text):
        raise ValueError("expected an http:// or https:// URL")
    return raw


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


def read_optional(found: FoundFile, explicit: bool, what: str) -> str | None:
    """The text of ``found``, None when absent and not ``explicit``; ConfigError otherwise."""
    path = Path(found.path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: {what} not found ({found.how})") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from None


# Allowed ranges. TTL caps: RFC 8767 §5 suggests capping stale/max TTLs at 7 days.
WEEK = 7 * 86400
PORT_ADDRESS = host_port(require_port=True)
PORT = in_range(parse_int, 1, 65535)
# The identity code sends at most one CSR per MIN_CSR_INTERVAL (5 s, vmagent/identity/
# rotation.py): a certificate must outlive two of them, or the agent is never ready (each cert
# would expire before the next one arrives). Kept here, not imported: config must not import
# the identity package (a test checks the two agree).
MIN_SECRET_TTL = 10.0


def _secret_ttl(raw: str) -> float:
    seconds = parse_duration(raw)
    if not MIN_SECRET_TTL <= seconds <= 365 * 86400:
        raise ValueError(
            f"must be between {format_seconds(MIN_SECRET_TTL)} and 8760h: the agent asks for a"
            " new certificate at most once every 5s, so a shorter-lived one would expire before"
            " its successor arrives (and istiod caps the lifetime at MAX_WORKLOAD_CERT_TTL)"
        )
    return seconds


SECRET_TTL_RANGE: Parser = _secret_ttl
DNS_TTL = in_range(parse_int, 0, WEEK)
TIMEOUT = in_range(parse_duration, 0.001, 300, "s")
CREDENTIAL_SOURCES = ("auto", "JWT", "GoogleComputeEngine", "AWS", "Azure", "")


def metadata_host(raw: str) -> str:
    """GCE_METADATA_HOST: ``host[:port]`` or a URL (as Google's client library accepts)."""
    return url(raw) if "://" in raw else host_port(require_port=False)(raw)
