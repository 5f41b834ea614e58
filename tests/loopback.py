"""Loopback helpers shared by the test suites (``from loopback import free_port``;
``tests/conftest.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"


def port_free(host: str, port: int) -> bool:
    """True when ``port`` can be bound on ``host`` for both UDP and TCP."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(family, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = LOOPBACK) -> int:
    """A port that is currently free for both UDP and TCP on ``host``, below the kernel's
    ephemeral range: a port from bind(0) lies inside it, where any process's outgoing
    connection (Envoy's, gRPC's) may take it before the test binds it (seen in CI). Never the
    same port twice in one test process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = 20000
    high = min(_ephemeral_range()[0], 65536) - 1
    chooser = random.Random()
    for _ in range(500):
        port = chooser.randint(low, high) if high > low else 0
        if port == 0:  # no room below the ephemeral range: the kernel's choice
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        if port not in _HANDED_OUT and port_free(host, port):
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free UDP+TCP port on {host}")


_HANDED_OUT: set[int] = set()  # per test process: two free_port() calls never collide
