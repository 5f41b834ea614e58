"""systemd's ``sd_notify`` protocol in pure Python: READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

Protocol (sd_notify(3), systemd.service(5)): one AF_UNIX datagram per message to the socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace, sent with a
leading NUL byte). ``$WATCHDOG_USEC`` (microseconds) asks for ``WATCHDOG=1`` at least that
often (systemd recommends every half period); ``$WATCHDOG_PID``, when set, names the one
process meant (another one's children ignore it). Without ``$NOTIFY_SOCKET`` every call does
nothing: ``vmagent run`` outside systemd behaves as before.

READY=1 goes out once, the first time the agent is ready by the same rule as
``/healthz/ready`` (no reasons left), never before: hashicorp/consul#7137 is what comes of a
notify that never arrives, and an early one makes ``systemctl start`` lie. Before that,
``STATUS=`` says what the agent is waiting for (:func:`progress`); ``EXTEND_TIMEOUT_USEC=``
keeps a start that is making progress from being killed at ``TimeoutStartSec``
(sd_notify(3))."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger("vmagent.status")

POLL_SECONDS = 0.5  # how often readiness is re-checked for READY=1 / STATUS=
# While starting, EXTEND_TIMEOUT_USEC= pushes systemd's start timeout (TimeoutStartSec) this
# far ahead, every EXTEND_EVERY_SECONDS, from the event loop: a start waiting for an
# unreachable istiod is retried inside the agent and not killed and restarted (taking the DNS
# proxy and the capture rules with it), while a hung start stops extending and is killed.
EXTEND_SECONDS = 60.0
EXTEND_EVERY_SECONDS = 20.0

# Why-not-ready reasons (Agent.not_ready) -> what STATUS= says while starting.
_WAITING = (
    ("certificate", "waiting for certificate"),
    ("control plane", "waiting for control plane"),
    ("name table", "waiting for name table"),
    ("envoy", "waiting for Envoy"),
)


def progress(reasons: Sequence[str]) -> str:
    """The STATUS= text for ``reasons`` (empty: ``"ready"``): the first thing waited for,
    then the reasons in full, e.g. ``"waiting for certificate (no valid workload
    certificate; ...)"``."""
    if not reasons:
        return "ready"
    first = reasons[0].lower()
    waiting = next((text for key, text in _WAITING if key in first), "not ready")
    return f"{waiting} ({'; '.join(reasons)})"


@dataclass
class NotifyState:
    """Pure: readiness reasons in, the messages to send out (sent once each change)."""

    ready_sent: bool = False
    last_status: str | None = None
    next_extend: float | None = None  # when EXTEND_TIMEOUT_USEC is next due (monotonic s)

    def observe(self, reasons: Sequence[str], now: float | None = None) -> list[str]:
        """Messages for readiness ``reasons`` at ``now`` (monotonic seconds; None: no
        EXTEND_TIMEOUT_USEC, as when systemd is not waiting for READY=1)."""
        messages: list[str] = []
        status = progress(reasons)
        if status != self.last_status:
            self.last_status = status
            messages.append(f"STATUS={status}")
        if not reasons and not self.ready_sent:
            self.ready_sent = True
            messages.append("READY=1")
        due = now is not None and (self.next_extend is None or now >= self.next_extend)
        if reasons and not self.ready_sent and due and now is not None:
            self.next_extend = now + EXTEND_EVERY_SECONDS
            messages.append(f"EXTEND_TIMEOUT_USEC={int(EXTEND_SECONDS * 1e6)}")
        return messages


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 (half of ``$WATCHDOG_USEC``), or None when systemd asked
    for none, asked another process (``$WATCHDOG_PID``), or the value is not a positive
    integer."""
    usec = environ.get("WATCHDOG_USEC", "")
    wanted_pid = environ.get("WATCHDOG_PID", "")
    if wanted_pid and wanted_pid != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def socket_address(name: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as an address for ``sendto``: ``@x`` is the abstract ``\\0x``."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """Sends sd_notify messages; a no-op without ``$NOTIFY_SOCKET``. Send errors (systemd
    gone, or not reading) are logged once and otherwise ignored: they must not stop the agent,
    and sending never blocks."""

    def __init__(self, environ: Mapping[str, str], pid: int | None = None) -> None:
        name = environ.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = socket_address(name) if name else None
        self.watchdog = watchdog_interval(environ, os.getpid() if pid is None else pid)
        self.state = NotifyState()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *messages: str) -> None:
        if self.address is None or not messages:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never block the event loop: a receiver that stops reading fills its queue
                # (net.unix.max_dgram_qlen, 10 by default) and a blocking send would hang the
                # agent; the message is dropped instead (EAGAIN is logged like other errors).
                sock.setblocking(False)
                sock.sendto("\n".join(messages).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify to %s failed: %s", self.address, exc)

    async def run(self, not_ready: Callable[[], list[str]]) -> None:
        """Until cancelled: READY=1 / STATUS= as readiness changes, and WATCHDOG=1 every half
        watchdog period, from this event loop (a hung loop stops the pings, and systemd
        restarts the service)."""
        if self.address is None:
            await asyncio.Event().wait()
            return
        loop = asyncio.get_running_loop()
        next_ping = loop.time()
        while True:
            self.send(*self.state.observe(not_ready(), loop.time()))
            pause = POLL_SECONDS
            if self.watchdog is not None:
                now = loop.time()
                if now >= next_ping:
                    self.send("WATCHDOG=1")
                    next_ping = now + self.watchdog
                pause = min(pause, max(0.0, next_ping - now))
            await asyncio.sleep(pause)

    def stopping(self) -> None:
        """STOPPING=1 (shutdown begins: systemd shows "deactivating")."""
        with contextlib.suppress(Exception):
            self.send("STOPPING=1", "STATUS=stopping")
