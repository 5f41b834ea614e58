"""Command line: ``vmagent <command> [<subcommand>] [options]``.

Each component registers its own subcommands (``vmagent/<component>/command.py``). A subcommand
sets two defaults on its parser: ``run(args, config) -> int`` and, optionally,
``overrides(args) -> dict[str, str]`` mapping flags to setting names, so flags take precedence
over the environment and ``cluster.env`` in the one :class:`~vmagent.config.Config`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from vmagent import __version__
from vmagent.config import Config, ConfigError, describe, load_config

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrars() -> list[Registrar]:
    from vmagent.agent import register as run
    from vmagent.dns.command import register as dns

    found: list[Registrar] = [run, dns]
    # Components from later issues register themselves here when present.
    for module in ("vmagent.identity.command", "vmagent.devmesh.command", "vmagent.devmesh.dev"):
        try:
            imported = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        found.append(imported.register)
    return found


def run_async(
    command: str, main: Coroutine[Any, Any, int | None], errors: tuple[type[Exception], ...]
) -> int:
    """Run a command's event loop; an expected failure becomes ``vmagent COMMAND: message`` on
    stderr and exit status 1 instead of a traceback. A None result means success (0)."""
    try:
        result = asyncio.run(main)
    except errors as exc:
        print(f"vmagent {command}: {exc}", file=sys.stderr)
        return 1
    return 0 if result is None else result


def _config_show(args: argparse.Namespace, config: Config) -> int:
    rows = describe(config)
    width = max(len(key) for key, _, _ in rows)
    for key, value, source in rows:
        print(f"{key:<{width}}  {value!r:<40}  {source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmagent", description="Bring this VM into an Istio service mesh."
    )
    parser.add_argument("--version", action="version", version=f"vmagent {__version__}")
    parser.add_argument(
        "--cluster-env",
        metavar="FILE",
        help="cluster.env written by `istioctl x workload entry configure` "
        "(default: $VMAGENT_CLUSTER_ENV or /etc/vmagent/cluster.env if present)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    config_cmd = commands.add_parser("config", help="inspect the effective configuration")
    config_sub = config_cmd.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    show = config_sub.add_parser("show", help="print every setting, its value and its source")
    show.set_defaults(run=_config_show)

    for register in _registrars():
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace, Config], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    overrides_of: Callable[[argparse.Namespace], dict[str, Any]] | None = getattr(
        args, "overrides", None
    )
    try:
        config = load_config(
            os.environ,
            overrides=overrides_of(args) if overrides_of else None,
            cluster_env=args.cluster_env,
        )
    except ConfigError as exc:
        print(f"vmagent: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(args, config)
    except KeyboardInterrupt:
        return 130
