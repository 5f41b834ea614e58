"""``vmagent dns serve``: the DNS proxy on its own, answering from a NameTable file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from typing import Any

from vmagent._compat import TaskGroup
from vmagent.config import Config
from vmagent.dns.service import DnsProxy
from vmagent.dns.table import NameTableError
from vmagent.dns.tablefile import TableFile

log = logging.getLogger("vmagent.dns")


def register(commands: Any) -> None:
    dns = commands.add_parser("dns", help="the caching DNS proxy")
    sub = dns.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a NameTable file and forward everything else upstream",
        description="Answer mesh names from an Istio NameTable (protobuf JSON) and forward "
        "and cache everything else. Reloads the file when it changes and on SIGHUP.",
    )
    serve.add_argument("--name-table", required=True, metavar="FILE", help="NameTable JSON file")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="serve UDP and TCP here; repeatable (default 127.0.0.1:15053 and [::1]:15053)",
    )
    serve.add_argument(
        "--upstream",
        action="append",
        metavar="HOST[:PORT]",
        help="upstream server; repeatable (default: resolv.conf nameservers)",
    )
    serve.add_argument("--resolv-conf", metavar="FILE", help="default /etc/resolv.conf")
    serve.add_argument(
        "--search", action="append", metavar="DOMAIN", help="search domain (default: resolv.conf)"
    )
    serve.add_argument("--namespace", metavar="NS", help="proxy namespace (default POD_NAMESPACE)")
    serve.add_argument("--cluster-domain", metavar="DOMAIN", help="default cluster.local")
    serve.add_argument("--ttl", type=int, metavar="SECONDS", help="TTL of table answers (30)")
    serve.add_argument("--parallel", action="store_true", help="ask all upstreams at once")
    serve.add_argument(
        "--allow-non-loopback",
        action="store_true",
        help="allow listening on non-loopback addresses (an open resolver otherwise)",
    )
    serve.set_defaults(run=_run_serve, overrides=_serve_overrides, flags=SERVE_FLAGS)


# The setting each flag sets, with the flag's spelling: errors name the flag the user typed.
SERVE_FLAGS = {
    "DNS_PROXY_ADDR": "--listen HOST:PORT",
    "VMAGENT_DNS_UPSTREAMS": "--upstream HOST[:PORT]",
    "VMAGENT_DNS_SEARCH": "--search DOMAIN",
    "VMAGENT_RESOLV_CONF": "--resolv-conf FILE",
    "POD_NAMESPACE": "--namespace NS",
    "VMAGENT_CLUSTER_DOMAIN": "--cluster-domain DOMAIN",
    "VMAGENT_DNS_TTL": "--ttl SECONDS",
    "DNS_FORWARD_PARALLEL": "--parallel",
    "VMAGENT_DNS_ALLOW_NON_LOOPBACK": "--allow-non-loopback",
}


def _serve_overrides(args: argparse.Namespace) -> dict[str, str]:
    overrides: dict[str, str] = {}
    lists = {"listen": "DNS_PROXY_ADDR", "upstream": "VMAGENT_DNS_UPSTREAMS"}
    lists["search"] = "VMAGENT_DNS_SEARCH"
    for attr, key in lists.items():
        if getattr(args, attr):
            overrides[key] = ",".join(getattr(args, attr))
    scalars = {
        "resolv_conf": "VMAGENT_RESOLV_CONF",
        "namespace": "POD_NAMESPACE",
        "cluster_domain": "VMAGENT_CLUSTER_DOMAIN",
        "ttl": "VMAGENT_DNS_TTL",
    }
    for attr, key in scalars.items():
        if getattr(args, attr) is not None:
            overrides[key] = str(getattr(args, attr))
    if args.parallel:
        overrides["DNS_FORWARD_PARALLEL"] = "true"
    if args.allow_non_loopback:
        overrides["VMAGENT_DNS_ALLOW_NON_LOOPBACK"] = "true"
    return overrides


def _run_serve(args: argparse.Namespace, config: Config) -> int:
    try:
        return asyncio.run(serve(config, args.name_table))
    except (NameTableError, ValueError, OSError) as exc:
        log.error("dns: %s", exc)
        print(f"vmagent dns serve: {exc}", flush=True)
        return 2 if isinstance(exc, ValueError) and not isinstance(exc, NameTableError) else 1


async def serve(config: Config, table_path: str) -> int:
    proxy = DnsProxy(config)
    table_file = TableFile(table_path, proxy.update_from_file)
    present = table_file.exists_at_start()
    try:
        await proxy.start()
    except OSError as exc:  # name what moves it: --listen (or DNS_PROXY_ADDR)
        hint = config.listen_hint("DNS_PROXY_ADDR")
        raise OSError(exc.errno, f"{exc.strerror or exc}; {hint}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, table_file.reload_soon)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if present:
            await table_file.apply_now()
        async with TaskGroup() as group:
            watchers = [
                group.create_task(table_file.watch()),
                group.create_task(proxy.watch_resolv_conf()),
            ]
            await stop.wait()
            log.info("dns: stopping")
            for task in watchers:
                task.cancel()
    finally:
        with contextlib.suppress(Exception):
            await proxy.close()
    return 0
