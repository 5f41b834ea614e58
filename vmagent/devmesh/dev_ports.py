"""``vmagent dev``'s ports, checked before anything starts: argparse types for its HOST:PORT
and PORT flags (a bad value is a usage error, exit 2, naming the flag with an example, as
``vmagent status --addr`` does), the check that no two of its listeners (devmesh, demo app,
agent, Envoy) share a port, and the command line a user can paste to run this program.

Pure: values in, values or problem lines out (no sockets)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmagent.config_values import address_list, host_port


def listen_type(
    example: str, allow_empty: bool = False, allow_zero: bool = True
) -> Callable[[str], str]:
    """An argparse ``type=`` for a listen address HOST:PORT, port 1..65535, or 0 with
    ``allow_zero`` (the kernel picks one; the banner says which). ``allow_empty``: '' turns
    the listener off."""
    check = host_port(require_port=True, allow_empty=allow_empty)

    def parsed(raw: str) -> str:
        text = raw.strip()
        ephemeral = allow_zero and text.endswith(":0")
        try:
            check(text[:-1] + "1" if ephemeral else raw)  # :0 passes the 1..65535 check
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}; e.g. {example}") from None
        return text

    return parsed


def dns_type(raw: str) -> str:
    """``--dns-listen``: DNS_PROXY_ADDR's form, IP[:PORT] (or localhost), comma-separated."""
    try:
        address_list(require_ip=True)(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; e.g. 127.0.0.1:15053") from None
    return raw.strip()


def port_type(example: str) -> Callable[[str], int]:
    """An argparse ``type=`` for a port number 1..65535."""

    def parsed(raw: str) -> int:
        text = raw.strip()
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise argparse.ArgumentTypeError(
                f"expected a port number 1-65535, got {raw!r}; e.g. {example}"
            )
        return int(text)

    return parsed


@dataclass(frozen=True)
class Listener:
    """One port ``vmagent dev`` binds. ``host`` None: every address (Envoy's readiness and
    Prometheus listeners bind 0.0.0.0); ``flag`` moves it."""

    what: str
    flag: str
    host: str | None
    port: int


def split(address: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[v6]:PORT`` (already checked) as (host, port)."""
    host, _, port = address.strip().rpartition(":")
    return host.strip("[]"), int(port)


def _hosts(host: str | None) -> set[str] | None:
    """The addresses a listen host covers (None: all of them)."""
    if host is None:
        return None
    if host == "localhost":
        return {"127.0.0.1", "::1"}
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: cannot tell, assume it may clash
    return None if address.is_unspecified else {str(address)}


def clashes(listeners: Sequence[Listener]) -> list[str]:
    """Two listeners on one port and overlapping addresses (one of them would fail to bind,
    or, for Envoy, only log it and never get ready): one line each, naming both flags. Port
    0 (the kernel picks) never clashes."""
    problems = []
    for i, a in enumerate(listeners):
        for b in listeners[i + 1 :]:
            if a.port != b.port or a.port == 0 or a.flag == b.flag:
                continue
            hosts_a, hosts_b = _hosts(a.host), _hosts(b.host)
            if hosts_a is not None and hosts_b is not None and not hosts_a & hosts_b:
                continue
            problems.append(
                f"port {a.port} is used twice: {a.what} ({a.flag}) and {b.what} ({b.flag});"
                f" every port of `vmagent dev` must differ: move one (see vmagent dev --help)"
            )
    return problems


def program(argv0: str, executable: str, which: str | None, cwd: str) -> str:
    """How the user runs this program again, ready to paste: ``vmagent`` when that name on
    PATH (``which``) is this program, else its path (relative to ``cwd`` when shorter, e.g.
    ``.venv/bin/vmagent`` after scripts/setup); under ``python -m vmagent``, the ``vmagent``
    script beside ``executable`` if there is one, else ``PYTHON -m vmagent``."""
    script = Path(argv0)
    if script.name == "__main__.py":  # python -m vmagent
        beside = Path(executable).parent / "vmagent"
        if not beside.is_file():
            return f"{shlex.quote(_short(executable, cwd))} -m vmagent"
        script = beside
    if which is not None and os.path.realpath(which) == os.path.realpath(script):
        return "vmagent"
    return shlex.quote(_short(str(script), cwd))


def _short(path: str, cwd: str) -> str:
    absolute = os.path.abspath(os.path.join(cwd, path))
    relative = os.path.relpath(absolute, cwd)
    if not relative.startswith(("./", "../")) and "/" not in relative:
        relative = f"./{relative}"  # a bare name would be looked up on PATH
    return relative if len(relative) < len(absolute) else absolute
