"""``vmagent devmesh serve`` (dev CA + xDS control plane), ``vmagent devmesh ca`` (the
development CA alone) and ``vmagent devmesh token``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from vmagent.cli import run_async
from vmagent.config import Config, parse_duration
from vmagent.config_values import host_port
from vmagent.devmesh.authority import Authority
from vmagent.devmesh.controlplane import DEFAULT_DEBUG_LISTEN, ControlPlaneSettings
from vmagent.devmesh.dataplane_model import DataplaneOptions
from vmagent.devmesh.serve import running_devmesh
from vmagent.devmesh.server import DevCa
from vmagent.devmesh.services import ConfigFileError
from vmagent.devmesh.settings import DevCaSettings, SettingsError, load_settings


def _settings(
    args: argparse.Namespace, config: Config, settings_file: str | None = None
) -> DevCaSettings:
    directory = str(Path(config.vmagent_state_dir) / "devmesh")
    path = settings_file if args.subcommand == "serve" else args.config
    settings = load_settings(path, config.trust_domain, directory)
    if args.dir:
        settings = DevCaSettings(**{**vars(settings), "directory": args.dir})
    return settings


def _run_ca(args: argparse.Namespace, config: Config) -> int:
    async def serve() -> None:
        settings = _settings(args, config)
        if args.listen:
            settings = DevCaSettings(**{**vars(settings), "listen": args.listen})
        ca = DevCa(settings)
        await ca.start()
        print(
            f"dev CA listening on {ca.address}; root: {settings.directory}/root-cert.pem",
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await ca.stop()

    return run_async("devmesh ca", serve(), (SettingsError, OSError, ValueError))


def _run_serve(args: argparse.Namespace, config: Config) -> int:
    async def serve() -> None:
        ca_settings = _settings(args, config, args.ca_config)
        if args.listen:
            ca_settings = DevCaSettings(**{**vars(ca_settings), "listen": args.listen})
        settings = ControlPlaneSettings(
            config_dir=args.config,
            grace=parse_duration(args.grace),
            poll_interval=parse_duration(args.poll),
            auto_allocate=not args.no_auto_allocate,
            debug_listen=args.debug_listen,
            dataplane=DataplaneOptions(capture=not args.no_capture),
        )
        async with running_devmesh(ca_settings, settings) as mesh:
            config_view = mesh.control_plane.state.config
            print(
                f"devmesh listening on {mesh.address} (CA + xDS, TLS); "
                f"root: {mesh.root_cert}; mesh config: {args.config} "
                f"({len(config_view.services)} services, {len(config_view.groups)} groups); "
                f"debug: {mesh.debug_url or 'off'}",
                flush=True,
            )
            await asyncio.Event().wait()

    return run_async(
        "devmesh serve", serve(), (ConfigFileError, SettingsError, OSError, ValueError)
    )


def _run_token(args: argparse.Namespace, config: Config) -> int:
    try:
        settings = _settings(args, config)
        ttl = parse_duration(args.ttl)
        authority = Authority.load_or_create(settings.directory, settings.trust_domain, time.time())
    except (SettingsError, OSError, ValueError) as exc:
        print(f"vmagent devmesh token: {exc}", file=sys.stderr)
        return 1
    namespace = args.namespace or config.namespace
    account = args.service_account or config.service_account
    print(authority.mint_token(namespace, account, time.time(), ttl))
    return 0


def _address(allow_empty: bool = False) -> Any:
    """An argparse ``type=`` for a listen address HOST:PORT (port 0..65535; 0 asks the kernel
    for a free port, and the listening line says which): a bad one is a usage error naming
    the flag (exit 2), not a traceback from bind()."""
    check = host_port(require_port=True, allow_empty=allow_empty)

    def parsed(raw: str) -> str:
        try:
            ephemeral = raw.strip().endswith(":0")
            check(raw.strip()[:-1] + "1" if ephemeral else raw)
            return raw.strip()
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}; e.g. 127.0.0.1:15012") from None

    return parsed


def register(commands: Any) -> None:
    devmesh = commands.add_parser("devmesh", help="development mesh (CA and control plane)")
    sub = devmesh.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve", help="run the dev CA and xDS control plane (NDS, auto-registration) on one port"
    )
    serve.add_argument(
        "--config", metavar="DIR", required=True, help="mesh config directory (docs/devmesh.md)"
    )
    serve.add_argument("--ca-config", metavar="FILE", help="dev CA settings (YAML)")
    serve.add_argument(
        "--dir", metavar="DIR", help="key directory (default: VMAGENT_STATE_DIR/devmesh)"
    )
    serve.add_argument(
        "--listen", metavar="HOST:PORT", type=_address(), help="default 127.0.0.1:15012"
    )
    serve.add_argument(
        "--debug-listen",
        metavar="HOST:PORT",
        type=_address(allow_empty=True),
        default=DEFAULT_DEBUG_LISTEN,
        help=f"debug HTTP server, '' for none (default {DEFAULT_DEBUG_LISTEN})",
    )
    serve.add_argument(
        "--grace", default="10s", help="WorkloadEntry cleanup grace period (default 10s)"
    )
    serve.add_argument("--poll", default="500ms", help="config directory poll interval")
    serve.add_argument(
        "--no-auto-allocate",
        action="store_true",
        help="no 240.240.x.y addresses for External services without addresses",
    )
    serve.add_argument(
        "--no-capture",
        action="store_true",
        help="proxies without iptables capture: outbound HTTP listeners bind "
        "127.0.0.1:<service port>, mesh endpoints are reached on 15006 (docs/devmesh.md)",
    )
    serve.set_defaults(run=_run_serve)
    ca = sub.add_parser("ca", help="run the development CA (IstioCertificateService)")
    token = sub.add_parser("token", help="print a dev bootstrap token the dev CA accepts")
    for parser in (ca, token):
        parser.add_argument("--config", metavar="FILE", help="dev CA settings (YAML)")
        parser.add_argument(
            "--dir", metavar="DIR", help="key directory (default: VMAGENT_STATE_DIR/devmesh)"
        )
    ca.add_argument(
        "--listen", metavar="HOST:PORT", type=_address(), help="default 127.0.0.1:15012"
    )
    ca.set_defaults(run=_run_ca)
    token.add_argument("--namespace", help="default: POD_NAMESPACE")
    token.add_argument("--service-account", help="default: SERVICE_ACCOUNT")
    token.add_argument("--ttl", default="1h", help="token lifetime (default 1h)")
    token.set_defaults(run=_run_token)
