"""``vmagent identity show | fetch [--force] | serve``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from vmagent.cli import run_async
from vmagent.config import Config
from vmagent.identity import rotation
from vmagent.identity.csr import KeySpecError, config_spiffe_id
from vmagent.identity.detect import detect
from vmagent.identity.manager import CertificateManager, IdentityError, create_manager
from vmagent.identity.sds import SdsServer, sds_socket_path
from vmagent.identity.store import CertStore
from vmagent.identity.tokens import CredentialError


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


LEARNED_TRUST_DOMAIN = "<trust domain learned from the CA>"


def _configured_identity(config: Config) -> str:
    """The SPIFFE ID the configuration asks for. ``TRUST_DOMAIN=''`` (as istioctl writes it)
    means the agent takes the CA's trust domain: say so, rather than print ``spiffe:///...``,
    which is no SPIFFE ID (SPIFFE-ID spec §2.1: the trust domain is not empty)."""
    if config.trust_domain:
        return config_spiffe_id(config)
    return f"spiffe://{LEARNED_TRUST_DOMAIN}/ns/{config.namespace}/sa/{config.service_account}"


async def _show(config: Config) -> dict[str, Any]:
    store = CertStore(config.output_certs)
    detection = await detect(config)
    status = store.load_status()
    bundle = store.load(time.time())
    info: dict[str, Any] = {
        "source": detection.source,
        "source_reason": detection.reason,
        "configured_identity": _configured_identity(config),
        "ca_address": config.ca_address,
        "certificate_dir": config.output_certs,
        "spiffe_id": bundle.spiffe_id if bundle else None,
        "serial": bundle.serial_hex() if bundle else None,
        "not_after": _iso(bundle.not_after) if bundle else None,
        "next_rotation": None,
        "last_error": status.get("last_error"),
        "last_attempt": status.get("last_attempt"),
    }
    if bundle is not None:
        schedule = rotation.Schedule(config.secret_grace_period_ratio, 0.0)
        due = rotation.rotation_time(bundle.created, bundle.not_after, schedule, 0.0)
        recorded = status.get("next_rotation") if status.get("serial") == info["serial"] else None
        info["next_rotation"] = recorded or _iso(due)
    return info


def _run_show(args: argparse.Namespace, config: Config) -> int:
    try:
        info = asyncio.run(_show(config))
    except CredentialError as exc:
        print(f"vmagent identity: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {'-' if value is None else value}")
    return 0 if info["spiffe_id"] else 1


async def _build(config: Config) -> CertificateManager:
    return await create_manager(config, os.environ)


def _run_fetch(args: argparse.Namespace, config: Config) -> int:
    async def fetch() -> int:
        manager = await _build(config)
        bundle, renewed = await manager.fetch_once(force=args.force)
        verb = "issued" if renewed else "kept (not yet due for rotation)"
        print(
            f"{verb}: {bundle.spiffe_id} serial {bundle.serial_hex()} "
            f"valid until {_iso(bundle.not_after)} in {config.output_certs}"
        )
        return 0

    try:
        return asyncio.run(fetch())
    except (IdentityError, CredentialError, KeySpecError) as exc:
        print(f"vmagent identity fetch: failed: {exc}", file=sys.stderr)
        return 1


def _run_serve(args: argparse.Namespace, config: Config) -> int:
    async def serve() -> None:
        manager = await _build(config)
        manager.load_from_disk()
        sds = SdsServer(manager, sds_socket_path(config))
        await sds.start()
        try:
            await manager.run()
        finally:
            await sds.stop()

    return run_async("identity serve", serve(), (CredentialError, KeySpecError, OSError))


def register(commands: Any) -> None:
    identity = commands.add_parser("identity", help="workload identity and certificates")
    sub = identity.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    show = sub.add_parser(
        "show", help="credential source, SPIFFE ID, serial, expiry, next rotation, last error"
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_run_show)
    fetch = sub.add_parser(
        "fetch", help="get a certificate now unless the stored one is before its rotation point"
    )
    fetch.add_argument("--force", action="store_true", help="always renew")
    fetch.set_defaults(run=_run_fetch)
    serve = sub.add_parser(
        "serve", help="keep the certificate rotated, serve it over SDS (VMAGENT_RUN_DIR/sds.sock)"
    )
    serve.set_defaults(run=_run_serve)
