"""Loopback helpers shared by the test suites (``from loopback import free_port``;
``tests/conftest.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

import socket

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


def free_port(host: str = LOOPBACK) -> int:
    """A port that is currently free for both UDP and TCP on ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port_free(host, port):
            return port
    raise RuntimeError(f"no free UDP+TCP port on {host}")
