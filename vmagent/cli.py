"""Command line: ``vmagent <command> [<subcommand>] [options]``.

Each component registers its own subcommands (``vmagent/<component>/command.py``). A subcommand
sets two defaults on its parser: ``run(args, config) -> int`` and, optionally,
``overrides(args) -> dict[str, str]`` mapping flags to setting names, so flags take precedence
over the environment and ``cluster.env`` in the one :class:`~vmagent.config.Config`; and
``flags``, setting name -> flag (``{"DNS_PROXY_ADDR": "--listen HOST:PORT"}``), so errors name
the flag the user typed.
"""

from __future__ import annotations

# Only light imports here: `vmagent` imports this module before main() runs, and Ctrl-C
# during a heavy import (asyncio pulls in ssl) would be a traceback; main() imports the rest.
import argparse
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from vmagent import __version__

if TYPE_CHECKING:
    from vmagent.config import Config

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# The modules that register each command. The command line's command is looked up here, so
# `vmagent run` does not import devmesh and the other commands (~4 MB of RSS for the agent's
# lifetime, issue 7 §5); help and unknown commands import them all.
_COMMAND_MODULES = {
    "run": "vmagent.agent_command",
    "dns": "vmagent.dns.command",
    "identity": "vmagent.identity.command",
    "status": "vmagent.status.command",
    "devmesh": "vmagent.devmesh.command",
    "dev": "vmagent.devmesh.dev",
    "capture": "vmagent.capture.command",
    "onboard": "vmagent.onboard.command",
}
_VALUED_OPTIONS = ("--cluster-env", "--log-level")  # global options that take the next word


class _DefaultLevel(str):
    """``--log-level``'s default ("info"), told apart from an explicit ``--log-level info``
    so that ``$VMAGENT_LOG_LEVEL`` applies only when the flag is absent."""


_DEFAULT_LEVEL = _DefaultLevel("info")


def _registrars(command: str | None = None) -> list[Registrar]:
    """Every command's registrar, or only ``command``'s (a key of ``_COMMAND_MODULES``)."""
    modules = [_COMMAND_MODULES[command]] if command else list(_COMMAND_MODULES.values())
    found: list[Registrar] = []
    for module in modules:
        try:
            imported = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            # Components from later issues register themselves when present.
            if exc.name != module or module in ("vmagent.agent_command", "vmagent.dns.command"):
                raise
            continue
        found.append(imported.register)
    return found


def _command_in(argv: Sequence[str]) -> tuple[str, ...]:
    """``(name,)`` of the command ``argv`` names, when it is one of ``_COMMAND_MODULES`` and
    no help is asked for; else ``()`` (every command is registered)."""
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help", "--version"):
            return ()
        if word in _VALUED_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return (word,) if word in _COMMAND_MODULES else ()
    return ()


def run_async(
    command: str, main: Coroutine[Any, Any, int | None], errors: tuple[type[Exception], ...]
) -> int:
    """Run a command's event loop; an expected failure becomes ``vmagent COMMAND: message`` on
    stderr and exit status 1 instead of a traceback. A None result means success (0).

    SIGINT (Ctrl-C) and SIGTERM cancel ``main``, whose cleanup runs, and the command exits 0
    quietly (commands that handle those signals themselves, like ``run``, replace this)."""
    import asyncio

    try:
        result = asyncio.run(_stoppable(main))
    except errors as exc:
        print(f"vmagent {command}: {_message(exc)}", file=sys.stderr)
        return 1
    return 0 if result is None else result


def _message(exc: Exception) -> str:
    """``str(exc)``, without the ``[Errno 98]`` prefix of an OSError whose message already
    says what failed (one that names a file keeps its usual form, which shows the file)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        return exc.strerror
    return str(exc)


async def _stoppable(main: Coroutine[Any, Any, int | None]) -> int | None:
    import asyncio

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopped: list[int] = []

    def stop(signum: int) -> None:
        stopped.append(signum)
        if task is not None:
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await main
    except asyncio.CancelledError:
        if not stopped:
            raise
        return None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _config_show(args: argparse.Namespace, config: Config) -> int:
    from vmagent.config import describe

    rows = describe(config)
    width = max(len(key) for key, _, _ in rows)
    for key, value, source in rows:
        print(f"{key:<{width}}  {value!r:<40}  {source}")
    return 0


def _config_reference(args: argparse.Namespace, config: Config) -> int:
    """``vmagent config reference > docs/configuration.md`` (what scripts/gen-docs runs)."""
    from vmagent.config_reference import reference

    sys.stdout.write(reference())
    return 0


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The options every command takes, before or after its name (``vmagent --cluster-env F
    config show`` = ``vmagent config show --cluster-env F``). On subcommands the defaults are
    suppressed, so an option given before the subcommand is not reset by its parser."""

    def default(value: str | None) -> str | None:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--cluster-env",
        metavar="FILE",
        default=default(None),
        help="cluster.env written by `istioctl x workload entry configure` "
        "(default: $VMAGENT_CLUSTER_ENV, else <VMAGENT_CONFIG_DIR>/cluster.env, else "
        "/var/lib/istio/envoy/cluster.env, if present)",
    )
    parser.add_argument(
        "--log-level",
        default=default(_DEFAULT_LEVEL),
        choices=["debug", "info", "warning", "error"],
        help="default: $VMAGENT_LOG_LEVEL, else info",
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:  # argparse keeps no public list of subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if all(child is not seen for seen in found):  # aliases share a parser
                    found.append(child)
    return found


def _finish(parser: argparse.ArgumentParser, top: bool) -> None:
    """Give every command the global options and remember which parser a namespace came
    from, so a command group given alone (``vmagent dns``) prints its own help."""
    if not top:
        _add_global_options(parser, suppress=True)
    parser.set_defaults(help_parser=parser)
    for child in _subparsers(parser):
        _finish(child, top=False)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (``command``) only that command's part of it."""
    parser = argparse.ArgumentParser(
        prog="vmagent", description="Bring this VM into an Istio service mesh."
    )
    parser.add_argument("--version", action="version", version=f"vmagent {__version__}")
    _add_global_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    config_cmd = commands.add_parser("config", help="inspect the effective configuration")
    config_sub = config_cmd.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    show = config_sub.add_parser("show", help="print every setting, its value and its source")
    show.set_defaults(run=_config_show)
    reference = config_sub.add_parser(
        "reference", help="print the reference of every setting and command (markdown)"
    )
    reference.set_defaults(run=_config_reference)

    for register in _registrars(command):
        register(commands)
    _finish(parser, top=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``vmagent`` command; returns the exit status. Ctrl-C at any moment (even while the
    modules load) exits 130 without a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130


def _main(argv: Sequence[str] | None) -> int:
    from vmagent.config import ConfigError, load_config

    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(*_command_in(words))
    args = parser.parse_args(words)
    run: Callable[[argparse.Namespace, Config], int] | None = getattr(args, "run", None)
    if run is None:
        # A command group without its subcommand: its own help, as argparse's usage errors
        # exit (2).
        args.help_parser.print_help()
        return 2
    from vmagent.status.journal import (
        JournalErrorStream,
        configure_logging,
        log_level,
        to_journal,
    )

    if to_journal(os.environ, sys.stderr):  # error lines at error priority, not info
        sys.stderr = JournalErrorStream(sys.stderr)

    try:  # the flag, else $VMAGENT_LOG_LEVEL; journald's format when stderr is the journal
        flag = None if isinstance(args.log_level, _DefaultLevel) else args.log_level
        configure_logging(log_level(flag, os.environ), os.environ, sys.stderr)
    except ValueError as exc:
        print(f"vmagent: configuration error: {exc}", file=sys.stderr)
        return 2
    overrides_of: Callable[[argparse.Namespace], dict[str, Any]] | None = getattr(
        args, "overrides", None
    )
    config: Config | None
    try:
        config = load_config(
            os.environ,
            overrides=overrides_of(args) if overrides_of else None,
            cluster_env=args.cluster_env,
            flags=getattr(args, "flags", None),  # key -> flag, so errors name the flag
        )
    except ConfigError as exc:
        if getattr(args, "needs_config", True) is False:
            # onboard replaces a broken configuration; status still finds a running agent
            # (its socket has a default) and reports what it can. Each says why it had none.
            args.config_error = str(exc)
            config = None
        else:
            print(f"vmagent: configuration error: {exc}", file=sys.stderr)
            return 2
    try:
        return run(args, config)  # type: ignore[arg-type]  # None only when needs_config False
    except BrokenPipeError:  # `vmagent config show | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
