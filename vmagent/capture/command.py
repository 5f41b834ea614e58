"""``vmagent capture apply | clean | show | watch``: traffic capture as ``istio-iptables``
does it (run as root or with CAP_NET_ADMIN; settings from cluster.env, see docs/capture.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from vmagent.capture import shell
from vmagent.config import Config

log = logging.getLogger(__name__)


def register(commands: Any) -> None:
    capture = commands.add_parser("capture", help="iptables traffic capture (DNS, TCP)")
    sub = capture.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    apply = sub.add_parser("apply", help="install the capture cluster.env asks for (idempotent)")
    apply.add_argument(
        "--no-watchdog",
        action="store_true",
        help="redirect DNS even while the agent's DNS proxy is down (no fail-open)",
    )
    apply.set_defaults(run=_run_apply)
    clean = sub.add_parser("clean", help="remove every rule and chain vmagent added")
    clean.set_defaults(run=_run_clean)
    show = sub.add_parser("show", help="print the iptables-restore input apply would run")
    show.add_argument("--clean", action="store_true", help="print what clean would run")
    show.add_argument(
        "--no-watchdog", action="store_true", help="as apply --no-watchdog would run it"
    )
    show.set_defaults(run=_run_show)
    watch = sub.add_parser("watch", help="the DNS fail-open watchdog (apply starts it)")
    watch.set_defaults(run=_run_watch)


def _fail(exc: Exception) -> int:
    print(f"vmagent capture: {exc}", file=sys.stderr)
    return 1


def _run_apply(args: argparse.Namespace, config: Config) -> int:
    if not shell.wanted(config):
        log.warning(
            "capture: nothing asked for (ISTIO_META_DNS_CAPTURE, ISTIO_SERVICE_CIDR and"
            " ISTIO_INBOUND_PORTS are unset): the base rules are installed, nothing is redirected"
        )
    try:
        shell.apply_capture(config, watchdog=not args.no_watchdog)
    except (shell.CaptureError, OSError) as exc:
        return _fail(exc)
    return 0


def _run_clean(args: argparse.Namespace, config: Config) -> int:
    try:
        shell.clean_capture(config)
    except (shell.CaptureError, OSError) as exc:
        return _fail(exc)
    return 0


def _run_show(args: argparse.Namespace, config: Config) -> int:
    try:
        live = args.clean or shell.initial_dns_live(config, not args.no_watchdog)
        texts = shell.plan(config, dns_live=live, clean=args.clean)
    except (shell.CaptureError, OSError) as exc:
        return _fail(exc)
    if not live:
        host, port = shell.dns_address(config)
        print(f"# DNS redirect left out: nothing answers on {host}:{port} yet (fail-open)")
    for family, text in texts.items():
        tool = "ip6tables-restore" if family == 6 else "iptables-restore"
        print(f"# {tool} --noflush")
        print(text or "# (nothing to change)\n", end="")
    return 0


def _run_watch(args: argparse.Namespace, config: Config) -> int:
    try:
        shell.watch(config)
    except KeyboardInterrupt:
        return 0
    return 0
