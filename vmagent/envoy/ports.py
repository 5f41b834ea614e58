"""Whether Envoy will be able to listen on a port: Envoy only logs a port it cannot bind and
then never gets ready, so the agent and ``vmagent dev`` check each port before starting it."""

from __future__ import annotations

import socket


def listen_blocked(host: str, port: int) -> OSError | None:
    """Bind and listen on ``host``:``port`` as Envoy does (SO_REUSEADDR, so only a live
    listener counts, not a socket in TIME_WAIT), then let go. Returns the error, or None when
    the port is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen()
        except OSError as exc:
            return exc
    return None
