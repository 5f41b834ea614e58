"""``vmagent dev``: a whole mesh on one machine, like ``consul agent -dev``.

devmesh (dev CA + xDS control plane + debug HTTP) from a config directory, a tiny demo app
answering the WorkloadGroup's readiness probe, and the agent itself (identity from a dev
bootstrap token, the xDS stream, auto-registration, health, the DNS proxy), all in one
process and one event loop. State lives in ``--dir`` (default ``.vmagent-dev``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from vmagent.agent import build_agent, host_addresses, serve
from vmagent.cli import run_async
from vmagent.config import Config, ConfigError, load_config
from vmagent.devmesh.controlplane import ControlPlaneSettings
from vmagent.devmesh.serve import DevMesh, running_devmesh
from vmagent.devmesh.services import ConfigFileError, WorkloadGroup
from vmagent.devmesh.settings import DevCaSettings
from vmagent.health import ProbeSpecError
from vmagent.identity.store import atomic_write
from vmagent.xds import NodeError, usable_ips

log = logging.getLogger("vmagent.dev")

SAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "devmesh"


def register(commands: Any) -> None:
    dev = commands.add_parser(
        "dev",
        help="run a development mesh, a demo app and the agent on this machine",
        description="Start devmesh (CA + xDS control plane) from a config directory, a demo "
        "app for the WorkloadGroup's probe, and vmagent registered into that group, with its "
        "DNS proxy. Edit the config directory while it runs: the DNS proxy follows.",
    )
    dev.add_argument(
        "--config", metavar="DIR", help=f"devmesh config directory (default {SAMPLE_CONFIG})"
    )
    dev.add_argument("--dir", default=".vmagent-dev", help="state directory (.vmagent-dev)")
    dev.add_argument("--group", default="vm/vm-web", metavar="NS/NAME", help="WorkloadGroup")
    dev.add_argument("--listen", default="127.0.0.1:15012", help="devmesh CA + xDS address")
    dev.add_argument("--debug-listen", default="127.0.0.1:15014", help="devmesh debug HTTP")
    dev.add_argument("--no-app", action="store_true", help="do not start the demo app")
    dev.set_defaults(run=_run_dev)


def _run_dev(args: argparse.Namespace, config: Config) -> int:
    errors = (ConfigFileError, ConfigError, NodeError, ProbeSpecError, OSError, ValueError)
    return run_async("dev", run_dev(args), errors)


async def run_dev(args: argparse.Namespace) -> int:
    workdir = Path(args.dir).resolve()
    config_dir = Path(args.config or SAMPLE_CONFIG)
    if not config_dir.is_dir():
        raise ValueError(f"devmesh config directory {config_dir} not found (pass --config DIR)")
    namespace, _, group_name = args.group.partition("/")
    ca_settings = DevCaSettings(
        trust_domain="cluster.local", directory=str(workdir / "devmesh"), listen=args.listen
    )
    settings = ControlPlaneSettings(config_dir=str(config_dir), debug_listen=args.debug_listen)
    async with running_devmesh(ca_settings, settings) as mesh:
        group = mesh.control_plane.state.config.group(namespace, group_name)
        if group is None:
            raise ValueError(f"no WorkloadGroup {args.group} in {config_dir}")
        overrides = _prepare_agent(mesh, group, workdir / "agent")
        app = None if args.no_app else await _start_demo_app(group)
        try:

            def reload() -> Config:
                return load_config(os.environ, overrides=overrides, cluster_env=os.devnull)

            agent = build_agent(reload())
            _print_banner(mesh, agent.node.id, agent.config, config_dir, app is not None)
            return await serve(agent, reload)
        finally:
            if app is not None:
                app.close()


def _prepare_agent(mesh: DevMesh, group: WorkloadGroup, home: Path) -> dict[str, str]:
    """Files and settings an onboarded VM would have: root cert, bootstrap token, and the
    cluster.env keys istioctl writes (as overrides, so the user's env cannot leak in)."""
    etc, state, run = home / "etc", home / "state", home / "run"
    for directory in (etc, state, run):
        directory.mkdir(parents=True, exist_ok=True)
    service_account = group.service_account or "default"
    token = mesh.ca.authority.mint_token(group.namespace, service_account, time.time())
    atomic_write(etc / "istio-token", token.encode(), 0o600)
    shutil.copyfile(mesh.root_cert, etc / "root-cert.pem")
    ips = usable_ips(host_addresses()) or ["127.0.0.1"]
    proxy_config: dict[str, Any] = {"discoveryAddress": mesh.address}
    if group.probe:
        proxy_config["readinessProbe"] = dict(group.probe)
    return {
        "VMAGENT_CONFIG_DIR": str(etc),
        "VMAGENT_STATE_DIR": str(state),
        "VMAGENT_RUN_DIR": str(run),
        "VMAGENT_MESH_CONFIG": os.devnull,
        "OUTPUT_CERTS": str(state / "certs"),
        "CREDENTIAL_FETCHER_TYPE": "JWT",
        "VMAGENT_TOKEN_FILE": str(etc / "istio-token"),
        "CA_ADDR": mesh.address,
        "ISTIOD_SAN": "istiod.istio-system.svc",
        "PROXY_CONFIG": json.dumps(proxy_config),
        "POD_NAMESPACE": group.namespace,
        "SERVICE_ACCOUNT": service_account,
        "TRUST_DOMAIN": "cluster.local",
        "ISTIO_SVC_IP": ips[0],
        "ISTIO_META_AUTO_REGISTER_GROUP": group.name,
        "ISTIO_META_DNS_CAPTURE": "true",
        "ISTIO_META_CLUSTER_ID": "Kubernetes",
        "ISTIO_META_WORKLOAD_NAME": group.name,
        "ISTIO_METAJSON_LABELS": json.dumps(dict(group.labels)),
    }


async def _start_demo_app(group: WorkloadGroup) -> asyncio.base_events.Server | None:
    """A stand-in for the VM's workload on the port its probe checks, so health is real."""
    probe = group.probe or {}
    http = probe.get("httpGet") or probe.get("http_get")
    if not isinstance(http, dict) or not http.get("port"):
        return None

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = f"hello from {group.namespace}/{group.name}\n".encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_server(answer, "127.0.0.1", int(http["port"]))
    except OSError as exc:
        log.warning(
            "demo app not started on port %s: %s (health will follow that port)", http["port"], exc
        )
        return None


def _print_banner(mesh: DevMesh, node_id: str, config: Config, config_dir: Path, app: bool) -> None:
    dns = config.dns_proxy_addr[0].replace("localhost", "127.0.0.1")
    dns_host, _, dns_port = dns.rpartition(":")
    dig = f"dig @{dns_host} -p {dns_port}"
    lines = [
        "",
        "vmagent dev: a mesh on this machine",
        f"  control plane (CA + xDS, TLS) {mesh.address}, debug {mesh.debug_url or 'off'}",
        f"  agent node {node_id}",
        f"  agent status http://{config.vmagent_status_addr}/status",
        f"  mesh config {config_dir} (edit it: the DNS proxy follows within a second)",
    ]
    if app:
        lines.append("  demo app answering the WorkloadGroup probe on 127.0.0.1")
    lines += [
        "",
        "Try:",
        f"  {dig} productpage.bookinfo.svc.cluster.local",
        f"  {dig} vm-web-direct.vm.svc.cluster.local    # this VM, once registered and healthy",
        f"  {dig} anything.partner.example.com          # a wildcard ServiceEntry",
        f"  curl -s {mesh.debug_url}/debug/registry    # the WorkloadEntry and its health",
        f"  curl -s http://{config.vmagent_status_addr}/healthz/ready",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
