"""``vmagent status``: ask the running agent how it is (``/status?v=1``) and say so.

The agent answers on ``$VMAGENT_RUN_DIR/status.sock`` (mode 0660: root and the ``vmagent``
group) and on ``VMAGENT_STATUS_ADDR``; ``--addr HOST:PORT`` picks the TCP endpoint. Without
``--addr``, the socket is asked first; when nothing answers there and ``VMAGENT_STATUS_ADDR``
is set (environment or cluster.env, not the default), that endpoint is asked next, so an agent
run by hand (``vmagent dev``, ``vmagent run`` with its own run dir) is found too. Exit
status like LSB's ``status`` action and ``systemctl status`` (LSB 3.0.0 "Init Script Actions";
systemctl(1)): 0 all healthy, 1 degraded or still starting (which part is said), 3 not
running (no socket, or nothing accepts on it), 4 unknown (the socket is not accessible, or the
agent did not answer). ``--wait SECONDS`` waits up to SECONDS for "healthy" (for cloud-init's
``runcmd``), then answers as without it."""

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
WAIT_POLL_SECONDS = 1.0  # --wait asks at most this often
MAX_WAIT_SECONDS = 86400.0
NOT_RUNNING = "vmagent is not running: "
START_HINT = "; start it with `systemctl start vmagent`"


class StatusError(Exception):
    """The agent could not be asked; ``code`` is the exit status, the message says why."""

    def __init__(self, message: str, code: int, lasting: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.lasting = lasting  # waiting cannot help (no permission): --wait stops at once


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
            lasting=True,
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


DEFAULT_RUN_DIR = "/run/vmagent"  # Config.vmagent_run_dir's default (the unit's RuntimeDirectory)
Target = tuple[str, bool]  # (a socket path or HOST:PORT, whether it is a Unix socket)


def targets(addr: str | None, config: Config | None) -> list[Target]:
    """Where to ask, in order: ``--addr`` alone; else the Unix socket, then
    ``VMAGENT_STATUS_ADDR`` when it is set explicitly (its source is not the default).
    ``config`` None (unreadable): the socket in $VMAGENT_RUN_DIR, else /run/vmagent."""
    if addr is not None:
        return [(addr, False)]
    if config is None:
        run_dir = os.environ.get("VMAGENT_RUN_DIR") or DEFAULT_RUN_DIR
        return [(os.path.join(run_dir, "status.sock"), True)]
    found: list[Target] = [(os.path.join(config.vmagent_run_dir, "status.sock"), True)]
    if config.sources.get("VMAGENT_STATUS_ADDR", "default") != "default":
        found.append((config.vmagent_status_addr, False))
    return found


def fetch_first(where: list[Target], timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    """The document from the first target that is running; when none is, one StatusError
    (exit 3) naming each. Other errors (no permission, no answer) stop at that target: an
    agent is there."""
    missing: list[str] = []
    hint = ""
    for address, unix in where:
        try:
            return fetch(address, unix, timeout)
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


def error_document(exc: StatusError) -> dict[str, Any]:
    """``--json``'s document when the agent could not be asked (docs/status.md): state
    ``not_running`` (exit 3) or ``unknown`` (exit 4), and why."""
    state = "not_running" if exc.code == EXIT_NOT_RUNNING else "unknown"
    return {"schema_version": 1, "state": state, "error": str(exc)}


def _show_error(exc: StatusError, as_json: bool) -> None:
    """The agent could not be asked: why on stderr; with ``--json`` also the one document
    on stdout (a script reading stdout gets JSON for every outcome)."""
    print(f"vmagent status: {exc}", file=sys.stderr)
    if as_json:
        _show(error_document(exc), True, None)


def _usage_error(args: argparse.Namespace, message: str) -> int:
    """As argparse's own usage errors: usage and ``vmagent status: error: ...``, exit 2."""
    parser: argparse.ArgumentParser | None = getattr(args, "help_parser", None)
    if parser is not None:
        parser.error(message)  # exits 2
    print(f"vmagent status: error: {message}", file=sys.stderr)
    return 2


def _seconds(example: str) -> Callable[[str], float]:
    """An argparse type for ``--wait``/``--watch``: seconds, 0 < SECONDS <= 86400 (argparse
    makes the error a usage error, exit 2, naming the flag; ``example`` shows a good one)."""

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not 0 < value <= MAX_WAIT_SECONDS:  # also NaN and inf
            raise argparse.ArgumentTypeError(
                f"{raw!r} is not a number of seconds between 0 (excluded) and"
                f" {MAX_WAIT_SECONDS:g}; e.g. {example}"
            )
        return value

    return parse


def _count(raw: str) -> int:
    """``--count``'s type: a whole number of rounds >= 1."""
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of rounds >= 1; e.g. --count 3")
    return value


def run_status(
    args: argparse.Namespace,
    config: Config | None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    if args.count is not None and args.watch is None:
        return _usage_error(
            args, "--count N needs --watch (e.g. vmagent status --watch 2 --count 3)"
        )
    where = targets(args.addr, config)
    if args.watch is not None:
        return _watch(where, args, sleep)
    try:
        if getattr(args, "wait", None) is None:
            view = fetch_first(where)
        else:
            view = _wait(where, float(args.wait), sleep, clock)
    except StatusError as exc:
        _show_error(exc, args.json)
        if config is None:
            print(
                f"vmagent status: (configuration not read: {args.config_error}; asked the"
                " default socket)",
                file=sys.stderr,
            )
        return exc.code
    _show(view, args.json, None)
    line = summary(view)
    if line:
        print(line, file=sys.stderr)
    return exit_status(view)


def _wait(
    where: list[Target], seconds: float, sleep: Callable[[float], None], clock: Callable[[], float]
) -> dict[str, Any]:
    """Ask every WAIT_POLL_SECONDS until the agent is healthy or ``seconds`` have passed;
    the last answer (a view, or the StatusError raised). Not running yet (the service may be
    starting), starting, degraded (a part may still recover) and no answer are waited
    through; an error waiting cannot fix (no permission) is raised at once. What is awaited
    is said on stderr when it changes (cloud-init's log)."""
    deadline = clock() + seconds
    said = ""
    while True:
        remaining = deadline - clock()
        try:
            view = fetch_first(where, max(0.1, min(TIMEOUT_SECONDS, remaining)))
        except StatusError as exc:
            if exc.lasting:
                raise
            last: dict[str, Any] | StatusError = exc
            waiting = "not running yet" if exc.code == EXIT_NOT_RUNNING else "no answer"
        else:
            if view.get("state") == "healthy":
                return view
            last, waiting = view, summary(view) or ""
            waiting = waiting.removeprefix("vmagent status: ")
        remaining = deadline - clock()
        if remaining <= 0:
            if isinstance(last, StatusError):
                raise last
            return last
        if waiting != said:
            print(
                f"vmagent status: waiting up to {remaining:.0f}s more: {waiting}", file=sys.stderr
            )
            said = waiting
        sleep(min(WAIT_POLL_SECONDS, remaining))


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
                _show_error(exc, args.json)
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
    repeat = parser.add_mutually_exclusive_group()
    repeat.add_argument(
        "--wait",
        type=_seconds("--wait 300"),
        metavar="SECONDS",
        help="wait up to SECONDS (at most 86400) for the agent to be healthy, asking once a"
        " second (not running yet and starting are waited through), then answer as without"
        " it: exit 0 as soon as it is healthy, else the status at the deadline (for"
        " cloud-init: runcmd: [vmagent status --wait 300])",
    )
    repeat.add_argument(
        "--watch",
        nargs="?",
        type=_seconds("--watch 2"),
        const=DEFAULT_WATCH_SECONDS,
        metavar="SECONDS",
        help=f"repeat every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C",
    )
    parser.add_argument(
        "--count", type=_count, metavar="N", help="with --watch: stop after N rounds"
    )
    # A configuration it cannot read (not in the vmagent group) must not hide the agent:
    # the default socket is still tried (cli passes config None).
    parser.set_defaults(run=run_status, needs_config=False)
