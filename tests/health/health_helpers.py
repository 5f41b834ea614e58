"""Real loopback servers and small utilities for the health tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import http.server
import os
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopback import free_port as free_port  # re-exported for the suite

from vmagent.health import HealthChecker, HealthEvent, ProbeSpec, parse_probe

WAIT = 10.0  # upper bound for any wait in these tests; reached only on failure


@dataclass
class Seen:
    """One request as the HTTP server saw it."""

    client: tuple[str, int]
    path: str
    headers: dict[str, str]
    header_lines: list[tuple[str, str]]


@dataclass
class AppServer:
    """A real HTTP(S) server in a thread. ``status`` is what it answers; ``script`` (if not
    empty) gives the status for each coming request, in order, before falling back to it."""

    status: int = 200
    script: list[int] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, seen: Seen) -> int:
        with self.lock:
            self.seen.append(seen)
            return self.script.pop(0) if self.script else self.status

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


@contextlib.contextmanager
def app_server(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[AppServer]:
    app = AppServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen = Seen(
                client=(self.client_address[0], self.client_address[1]),
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                header_lines=list(self.headers.items()),
            )
            code = app.answer(seen)
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # the prober hangs up after the status line

    server = Server((host, 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    app.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield app
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def self_signed_context(tmp: Path) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


def spec(
    raw: dict[str, Any],
    *,
    initial_delay_seconds: float | None = None,
    timeout_seconds: float | None = None,
    period_seconds: float | None = None,
) -> ProbeSpec:
    """Parse ``raw`` and override timings with fractions of a second for fast tests."""
    parsed = parse_probe(raw)
    return dataclasses.replace(
        parsed,
        initial_delay_seconds=parsed.initial_delay_seconds
        if initial_delay_seconds is None
        else initial_delay_seconds,
        timeout_seconds=parsed.timeout_seconds if timeout_seconds is None else timeout_seconds,
        period_seconds=parsed.period_seconds if period_seconds is None else period_seconds,
    )


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_until_gone(pids: list[int]) -> list[int]:
    """Poll (bounded) until none of ``pids`` is alive; return those still alive."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if process_alive(pid)]
        if not alive:
            return []
        time.sleep(0.02)
    return [pid for pid in pids if process_alive(pid)]


def read_pid(path: Path) -> int:
    """Wait (bounded) for a script to write its pid file, then read it."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text.isdigit():
            return int(text)
        time.sleep(0.02)
    raise AssertionError(f"{path} was never written")


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, 9)


class Events:
    """Collects a checker's events; ``next()`` waits (bounded) for the next one."""

    def __init__(self, note: Callable[[], object] | None = None) -> None:
        self.queue: asyncio.Queue[HealthEvent] = asyncio.Queue()
        self.all: list[HealthEvent] = []
        self.notes: list[object] = []
        self._note = note

    def __call__(self, event: HealthEvent) -> None:
        self.all.append(event)
        if self._note is not None:
            self.notes.append(self._note())
        self.queue.put_nowait(event)

    async def next(self) -> HealthEvent:
        return await asyncio.wait_for(self.queue.get(), WAIT)


@contextlib.asynccontextmanager
async def running(checker: HealthChecker) -> Any:
    """Run ``checker`` as a task; cancel it and wait for it on exit."""
    task = asyncio.create_task(checker.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: Callable[[], bool]) -> None:
    """Wait (bounded) for ``predicate`` to hold."""
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())
