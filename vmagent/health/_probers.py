"""The probes themselves (thin asyncio): HTTP GET, TCP connect, exec, gRPC health.

Behaviour follows ``pkg/istio-agent/health/health_probers.go``; messages keep Go's wording where
users may already search for it (``status code was not from [200,400), bad code 503``).
Every probe is bounded by the spec's ``timeoutSeconds`` and leaves nothing behind: sockets are
closed, an exec probe's whole process group is killed on timeout or cancellation.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._spec import ExecAction, GrpcAction, HttpGetAction, ProbeAction, ProbeSpec, TcpSocketAction
from ._state import ProbeResult

__all__ = ["MESH_SOURCE_V4", "MESH_SOURCE_V6", "USER_AGENT", "run_probe"]

USER_AGENT = "istio-probe/1.0"
# Istio's UpstreamLocalAddressIPv4/IPv6: traffic from these addresses over lo is exempt from the
# sidecar's inbound capture (istio-iptables), so probes reach the app directly, not via Envoy.
MESH_SOURCE_V4 = "127.0.0.6"
MESH_SOURCE_V6 = "::6"
# connect() errors that mean "this source address cannot reach that destination" (a loopback
# source towards a non-local address gives EINVAL: istio/istio#34407) -> retry without it.
_SOURCE_REJECTED = {errno.EINVAL, errno.EADDRNOTAVAIL}
_MAX_OUTPUT = 512


class _ProbeFailed(Exception):
    """Raised inside a prober with the message to report."""


async def run_probe(spec: ProbeSpec) -> ProbeResult:
    """Run ``spec``'s probe once, bounded by its timeout. Never raises (except cancellation)."""
    action = spec.action
    try:
        await asyncio.wait_for(_PROBERS[type(action)](action, spec), spec.timeout_seconds)
    except _ProbeFailed as exc:
        return ProbeResult.failed(str(exc))
    except asyncio.TimeoutError:
        return ProbeResult.failed(f"{_subject(action)}: timed out after {spec.timeout_seconds:g}s")
    except (OSError, grpc.RpcError) as exc:  # defensive: a prober let one through
        return ProbeResult.failed(f"{_subject(action)}: {_os_message(exc)}")
    return ProbeResult.ok()


def _subject(action: ProbeAction) -> str:
    if isinstance(action, HttpGetAction):
        return f'Get "{action.url}"'
    if isinstance(action, TcpSocketAction):
        return f"dial tcp {_join(action.host, action.port)}"
    if isinstance(action, ExecAction):
        return f"command {action.command[0]}"
    return f"gRPC health check {_join(action.host, action.port)}"


# --- connecting ----------------------------------------------------------------------------


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _os_message(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"lookup failed: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, ssl.SSLError):
        return os.strerror(exc.errno).lower()  # asyncio's strerror is "Connect call failed ..."
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _connect(host: str, port: int, *, mesh_source: bool) -> socket.socket:
    """A connected non-blocking socket to ``host:port``, trying each resolved address in turn.

    With ``mesh_source``, bind the mesh source address (127.0.0.6 / ::6) first, and connect
    without an explicit source if that address cannot be bound (``::6`` usually is not
    assigned; non-Linux systems only have 127.0.0.1) or cannot reach the destination.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _ProbeFailed(f"dial tcp {_join(host, port)}: {_os_message(exc)}") from None
    if mesh_source:
        # Istio dials with LocalAddr 127.0.0.6, and Go then only tries IPv4 destinations: so
        # "localhost" means 127.0.0.1 from 127.0.0.6. Keep IPv6 as a fallback, IPv4 first.
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
    last: tuple[str, OSError] | None = None
    for family, type_, proto, _, addr in infos:
        target = _join(str(addr[0]), port)
        sources: list[str | None] = [None]
        if mesh_source and family in (socket.AF_INET, socket.AF_INET6):
            sources.insert(0, MESH_SOURCE_V4 if family == socket.AF_INET else MESH_SOURCE_V6)
        for source in sources:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                if source is not None:
                    try:
                        sock.bind((source, 0))
                    except OSError:
                        sock.close()
                        continue
                await loop.sock_connect(sock, addr)
            except OSError as exc:
                sock.close()
                last = (target, exc)
                if source is not None and exc.errno in _SOURCE_REJECTED:
                    continue
                break
            except BaseException:
                sock.close()
                raise
            return sock
    if last is None:
        raise _ProbeFailed(f"dial tcp {_join(host, port)}: no usable address")
    raise _ProbeFailed(f"dial tcp {last[0]}: connect: {_os_message(last[1])}")


# --- HTTP ----------------------------------------------------------------------------------


def _request(action: HttpGetAction) -> bytes:
    """The GET request bytes: custom headers in order; a ``Host`` header sets the request host."""
    host: str | None = None
    user_agent = True
    lines = [f"GET {action.path} HTTP/1.1"]
    for name, value in action.headers:
        if name.lower() == "host":
            host = value if host is None else host  # the first Host header wins
            continue
        user_agent = user_agent and name.lower() != "user-agent"
        lines.append(f"{name}: {value}")
    lines.insert(1, f"Host: {host if host is not None else _join(action.host, action.port)}")
    if user_agent:
        lines.insert(2, f"User-Agent: {USER_AGENT}")
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("utf-8")


def _status(line: bytes) -> int:
    if not line:
        raise _ProbeFailed("server closed the connection without a response")
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise _ProbeFailed(f"malformed HTTP response: {line[:80]!r}")
    return int(parts[1])


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _http_status(action: HttpGetAction) -> int:
    sock = await _connect(action.host, action.port, mesh_source=True)
    context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    if action.scheme == "https":  # Istio's prober does not verify the app's certificate
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        server_hostname = "" if _is_ip(action.host) else action.host
    try:
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=context, server_hostname=server_hostname
        )
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError):
            raise _ProbeFailed(_os_message(exc)) from None
        raise
    try:
        writer.write(_request(action))
        await writer.drain()
        line = await reader.readline()
    except OSError as exc:
        raise _ProbeFailed(_os_message(exc)) from None
    except ValueError:  # status line longer than the stream limit
        raise _ProbeFailed("malformed HTTP response: status line too long") from None
    finally:
        writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return _status(line)


async def _probe_http(action: HttpGetAction, spec: ProbeSpec) -> None:
    try:
        status = await _http_status(action)
    except _ProbeFailed as exc:
        raise _ProbeFailed(f'Get "{action.url}": {exc}') from None
    if not 200 <= status < 400:
        raise _ProbeFailed(f"status code was not from [200,400), bad code {status}")


# --- TCP -----------------------------------------------------------------------------------


async def _probe_tcp(action: TcpSocketAction, spec: ProbeSpec) -> None:
    # Istio's TCP prober dials without the mesh source address.
    sock = await _connect(action.host, action.port, mesh_source=False)
    sock.close()


# --- exec ----------------------------------------------------------------------------------


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _output(out: Any) -> str:
    out.seek(0)
    text = out.read(_MAX_OUTPUT + 1).decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:_MAX_OUTPUT] + ("..." if len(text) > _MAX_OUTPUT else "")


async def _probe_exec(action: ExecAction, spec: ProbeSpec) -> None:
    """Run the command in its own session (= process group), output to a temporary file.

    A file, not a pipe: a background child inheriting a pipe would keep it open after the
    command exits. On timeout or cancellation the whole group is killed with SIGKILL.
    """
    with tempfile.TemporaryFile() as out:
        try:
            proc = await asyncio.create_subprocess_exec(
                *action.command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise _ProbeFailed(f"exec {action.command[0]}: {_os_message(exc)}") from None
        try:
            code = await proc.wait()
        finally:
            if proc.returncode is None:  # timed out or cancelled: nothing may outlive us
                _kill_group(proc.pid)
                await proc.wait()
        if code == 0:
            return
        output = _output(out)
    reason = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    raise _ProbeFailed(f"command {action.command[0]}: {reason}" + (f": {output}" if output else ""))


# --- gRPC ----------------------------------------------------------------------------------


async def _probe_grpc(action: GrpcAction, spec: ProbeSpec) -> None:
    target = _join(action.host, action.port)
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=action.service)
        try:
            response = await stub.Check(request, timeout=spec.timeout_seconds)
        except grpc.aio.AioRpcError as exc:
            raise _ProbeFailed(
                f"gRPC health check {target}: rpc error: code = {exc.code().name}"
                f" desc = {exc.details()}"
            ) from None
    status = int(response.status)
    if status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        raise _ProbeFailed(f'service unhealthy (responded with "{name}")')


_PROBERS: dict[type, Callable[[Any, ProbeSpec], Awaitable[None]]] = {
    HttpGetAction: _probe_http,
    TcpSocketAction: _probe_tcp,
    ExecAction: _probe_exec,
    GrpcAction: _probe_grpc,
}
