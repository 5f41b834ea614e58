"""``vmagent status``: ask the running agent how it is (``/status?v=1``) and say so.

The agent answers on ``$VMAGENT_RUN_DIR/status.sock`` (mode 0660: root and the ``vmagent``
group) and on ``VMAGENT_STATUS_ADDR``; ``--addr HOST:PORT`` picks the TCP endpoint. Without
``--addr``, the socket is asked first; when nothing answers there and ``VMAGENT_STATUS_ADDR``
is set (environment or cluster.env, not the default), that endpoint is asked next, so an agent
run by hand (``vmagent dev``, ``vmagent run`` with its own run dir) is found too. Exit
status like LSB's ``status`` action and ``systemctl status`` (LSB 3.0.0 "Init Script Actions";
systemctl(1)): 0 all healthy, 1 degraded or still starting (which part is said), 3 not
running (no socket, or nothing accepts on it), 4 unknown (the socket is not accessible, or the
agent did not answer)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmagent.config_values import PORT_ADDRESS, split_host_port

if TYPE_CHECKING:
    from vmagent.config import Config

EXIT_OK, EXIT_DEGRADED, EXIT_NOT_RUNNING, EXIT_UNKNOWN = 0, 1, 3, 4
TIMEOUT_SECONDS = 5.0
DEFAULT_WATCH_SECONDS = 2.0
NOT_RUNNING = "vmagent is not running: "
START_HINT = "; start it with `systemctl start vmagent`"


class StatusError(Exception):
    """The agent could not be asked; ``code`` is the exit status, the message says why."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix stream socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def fetch(where: str, unix: bool, timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    """The ``/status?v=1`` document from the agent at ``where`` (a socket path, or HOST:PORT).
    StatusError with the exit status and what to do when it cannot be had."""
    if unix:
        conn: http.client.HTTPConnection = _UnixConnection(where, timeout)
    else:
        host, port = split_host_port(where, None)  # checked by _address / Config
        conn = http.client.HTTPConnection(host, port, timeout)
    try:
        conn.request("GET", "/status?v=1")
        reply = conn.getresponse()
        body = reply.read()
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        what = "no socket" if isinstance(exc, FileNotFoundError) else "connection refused"
        raise StatusError(
            f"{NOT_RUNNING}{where}: {what}" + (START_HINT if unix else ""),
            EXIT_NOT_RUNNING,
        ) from None
    except PermissionError:
        raise StatusError(
            f"cannot open {where}: permission denied; run as root (sudo vmagent status) or"
            " join the group vmagent (usermod -aG vmagent $USER, then log in again)",
            EXIT_UNKNOWN,
        ) from None
    except TimeoutError:
        raise StatusError(
            f"vmagent did not answer on {where} within {timeout:g}s (is it hung? see"
            " `journalctl -u vmagent`)",
            EXIT_UNKNOWN,
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise StatusError(f"cannot ask vmagent at {where}: {exc}", EXIT_UNKNOWN) from None
    finally:
        conn.close()
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if reply.status != 200 or not isinstance(doc, dict) or doc.get("schema_version") != 1:
        raise StatusError(
            f"{where} answered HTTP {reply.status} without a status document (schema 1);"
            " is it a vmagent of this version?",
            EXIT_UNKNOWN,
        )
    return doc


def exit_status(view: dict[str, Any]) -> int:
    return EXIT_OK if view.get("state") == "healthy" else EXIT_DEGRADED


def summary(view: dict[str, Any]) -> str | None:
    """The one line for stderr when not healthy: which parts."""
    if view.get("state") == "healthy":
        return None
    parts = sorted({p["part"] for p in view.get("problems") or []})
    return f"vmagent status: {view.get('state')}: " + (", ".join(parts) or "not ready")


def _show(view: dict[str, Any], as_json: bool, qps: float | None) -> None:
    from vmagent.status.render import render

    if as_json:
        sys.stdout.write(json.dumps(view, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render(view, qps))
    sys.stdout.flush()


def _address(raw: str) -> str:
    """``--addr``'s type: HOST:PORT with a port 1..65535 (argparse makes the error a usage
    error, exit 2, naming --addr)."""
    try:
        return str(PORT_ADDRESS(raw))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; e.g. 127.0.0.1:15020") from None


Target = tuple[str, bool]  # (a socket path or HOST:PORT, whether it is a Unix socket)


def targets(addr: str | None, config: Config) -> list[Target]:
    """Where to ask, in order: ``--addr`` alone; else the Unix socket, then
    ``VMAGENT_STATUS_ADDR`` when it is set explicitly (its source is not the default)."""
    if addr is not None:
        return [(addr, False)]
    found: list[Target] = [(os.path.join(config.vmagent_run_dir, "status.sock"), True)]
    if config.sources.get("VMAGENT_STATUS_ADDR", "default") != "default":
        found.append((config.vmagent_status_addr, False))
    return found


def fetch_first(where: list[Target]) -> dict[str, Any]:
    """The document from the first target that is running; when none is, one StatusError
    (exit 3) naming each. Other errors (no permission, no answer) stop at that target: an
    agent is there."""
    missing: list[str] = []
    hint = ""
    for address, unix in where:
        try:
            return fetch(address, unix)
        except StatusError as exc:
            if exc.code != EXIT_NOT_RUNNING:
                raise
            text = str(exc).removeprefix(NOT_RUNNING)
            hint = START_HINT if text.endswith(START_HINT) else hint
            missing.append(
                text.removesuffix(START_HINT)
                + ("" if unix or len(where) == 1 else " (VMAGENT_STATUS_ADDR)")
            )
    raise StatusError(NOT_RUNNING + ", ".join(missing) + hint, EXIT_NOT_RUNNING)


def run_status(
    args: argparse.Namespace, config: Config, sleep: Callable[[float], None] = time.sleep
) -> int:
    where = targets(args.addr, config)
    if args.watch is None:
        try:
            view = fetch_first(where)
        except StatusError as exc:
            print(f"vmagent status: {exc}", file=sys.stderr)
            return exc.code
        _show(view, args.json, None)
        line = summary(view)
        if line:
            print(line, file=sys.stderr)
        return exit_status(view)
    return _watch(where, args, sleep)


def _watch(where: list[Target], args: argparse.Namespace, sleep: Callable[[float], None]) -> int:
    """Show the status every ``args.watch`` seconds until Ctrl-C (or ``--count`` rounds);
    the exit status is the last round's. The DNS query rate is measured between rounds."""
    interval = max(0.1, float(args.watch))
    code, rounds = EXIT_UNKNOWN, 0
    previous: tuple[float, int] | None = None
    try:
        while args.count is None or rounds < args.count:
            if rounds:
                sleep(interval)
            rounds += 1
            if sys.stdout.isatty() and not args.json:
                sys.stdout.write("\x1b[H\x1b[2J")  # clear, as watch(1) does
            try:
                view = fetch_first(where)
            except StatusError as exc:
                print(f"vmagent status: {exc}", file=sys.stderr)
                code, previous = exc.code, None
                continue
            sampled = (time.monotonic(), int(view["dns"]["queries_total"]))
            qps = None
            if previous is not None and sampled[0] > previous[0]:
                qps = max(0, sampled[1] - previous[1]) / (sampled[0] - previous[0])
            previous = sampled
            _show(view, args.json, qps)
            code = exit_status(view)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends watching: not an error
    return code


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "status",
        help="show how the running agent is: identity, control plane, Envoy, DNS, problems",
        description="Ask the running vmagent (over $VMAGENT_RUN_DIR/status.sock, or --addr) "
        "for its state. Exit status: 0 healthy, 1 degraded or starting, 3 not running, "
        "4 unknown (socket not accessible, no answer). --json prints the schema of "
        "docs/status.md.",
    )
    parser.add_argument(
        "--addr",
        metavar="HOST:PORT",
        type=_address,
        help="ask this TCP status endpoint (the agent's VMAGENT_STATUS_ADDR; `vmagent dev` "
        "prints its own) instead of the Unix socket. Without it, a VMAGENT_STATUS_ADDR set in "
        "the environment or cluster.env is asked when the socket does not answer",
    )
    parser.add_argument("--json", action="store_true", help="print the status document")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=DEFAULT_WATCH_SECONDS,
        metavar="SECONDS",
        help=f"repeat every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C",
    )
    parser.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N rounds")
    parser.set_defaults(run=run_status)
