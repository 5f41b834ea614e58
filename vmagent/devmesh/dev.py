"""``vmagent dev``: a whole mesh on one machine, like ``consul agent -dev``.

devmesh (dev CA + xDS control plane + debug HTTP) from a config directory, a tiny demo app
answering the WorkloadGroup's readiness probe (and ``/whoami``, the caller's SPIFFE ID), and
the agent itself (identity from a dev bootstrap token, the xDS stream, auto-registration,
health, the DNS proxy, and Envoy with SDS and the xDS proxy), all in one process and one
event loop (Envoy is the agent's child process). State lives in ``--dir`` (default
``.vmagent-dev``).

There is no traffic capture (no iptables), so devmesh serves the data plane in its
``capture=False`` mode (docs/devmesh.md, "Without traffic capture"): outbound HTTP listeners
bind ``--outbound-bind`` (127.0.0.2, so the service port 8080 does not collide with the demo
app on 127.0.0.1:8080) and mesh endpoints are reached on the inbound listener's port."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from vmagent.agent import build_agent, host_addresses
from vmagent.agent_command import serve
from vmagent.cli import run_async
from vmagent.config import Config, ConfigError, load_config
from vmagent.devmesh.controlplane import DEFAULT_DEBUG_LISTEN, ControlPlaneSettings
from vmagent.devmesh.dataplane_model import DataplaneOptions
from vmagent.devmesh.demoapp import DemoApp, start_demo_app
from vmagent.devmesh.dev_agent import DEV_FLAGS as DEV_FLAGS  # config_reference reads it
from vmagent.devmesh.dev_agent import app_probe, preflight, prepare_agent, probe_port
from vmagent.devmesh.dev_envoy import (
    app_port_move,
    check_envoy_ports,
    mesh_request_lines,
)
from vmagent.devmesh.dev_ports import (
    dns_type,
    listen_type,
    port_type,
    program,
)
from vmagent.devmesh.serve import DevMesh, running_devmesh
from vmagent.devmesh.services import ConfigFileError, WorkloadGroup, load_directory
from vmagent.devmesh.settings import DevCaSettings
from vmagent.health import ProbeSpecError
from vmagent.xds import NodeError, usable_ips

log = logging.getLogger("vmagent.dev")

CHECKOUT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "devmesh"
PACKAGED_CONFIG = "examples"  # inside this package: the same files, shipped in the wheel
PORTS_HELP = """\
ports (every one can move; defaults in brackets):
  --listen HOST:PORT         devmesh CA + xDS, TLS gRPC        [127.0.0.1:15012]
  --debug-listen HOST:PORT   devmesh debug HTTP (/debug/...)   [127.0.0.1:15014]
  --dns-listen HOST:PORT     the agent's DNS proxy, UDP + TCP  [$DNS_PROXY_ADDR, else
                                                                localhost:15053]
  --status-listen HOST:PORT  the agent's status endpoint       [$VMAGENT_STATUS_ADDR, else
                                                                127.0.0.1:15020]
  --app-port PORT            the demo app on 127.0.0.1; the agent's readiness probe and the
                             group's template port (where Envoy's inbound forwards) follow it
                             [the WorkloadGroup probe's port: 8080 in the example]
Envoy's ports (VMAGENT_ENVOY=false: no Envoy):
  --envoy-admin-port PORT    admin on 127.0.0.1 (ProxyConfig proxyAdminPort)          [15000]
  --inbound-port PORT        inbound mTLS listener on --ip                            [15006]
  --outbound-port PORT       virtualOutbound listener on --ip                         [15001]
  --readiness-port PORT      /healthz/ready on 0.0.0.0 ($VMAGENT_ENVOY_READINESS_PORT) [15021]
  --prometheus-port PORT     /stats/prometheus on 0.0.0.0
                             ($VMAGENT_ENVOY_PROMETHEUS_PORT)                         [15090]
  --outbound-bind ADDRESS    the outbound HTTP listeners, one per service port, e.g.
                             ADDRESS:8080 for vm-web (no capture: call them directly)
                                                                                  [127.0.0.2]
  --ip ADDRESS               the VM's address (its WorkloadEntry; mesh requests reach
                             Envoy's inbound listener there) [the host's first non-loopback
                             address, else 127.0.0.1]
Example, beside a real Istio agent:
  vmagent dev --listen 127.0.0.1:25012 --debug-listen 127.0.0.1:25014 \\
      --dns-listen 127.0.0.1:25053 --status-listen 127.0.0.1:25020 --app-port 28080 \\
      --envoy-admin-port 25000 --inbound-port 25006 --outbound-port 25001 \\
      --readiness-port 25021 --prometheus-port 25090 --outbound-bind 127.0.0.3

mesh config: without --config, examples/devmesh of a source checkout (edit it while it runs),
else a copy of the example shipped in the package, made once in DIR/mesh (edit that copy).
"""


def register(commands: Any) -> None:
    dev = commands.add_parser(
        "dev",
        help="run a development mesh, a demo app and the agent on this machine",
        description="Start devmesh (CA + xDS control plane) from a config directory, a demo "
        "app for the\nWorkloadGroup's probe, and vmagent registered into that group, with its "
        "DNS proxy and Envoy.\nThe banner shows a request through Envoy with mTLS to the demo "
        "app. Edit the config\ndirectory while it runs: the DNS proxy and Envoy follow.",
        epilog=PORTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dev.add_argument(
        "--config",
        metavar="DIR",
        help="devmesh config directory (default: see 'mesh config' below)",
    )
    dev.add_argument("--dir", default=".vmagent-dev", help="state directory (.vmagent-dev)")
    dev.add_argument("--group", default="vm/vm-web", metavar="NS/NAME", help="WorkloadGroup")
    # Every port flag is checked here: a bad value is a usage error (exit 2) naming the flag.
    dev.add_argument(
        "--listen",
        type=listen_type("127.0.0.1:15012"),
        default="127.0.0.1:15012",
        metavar="HOST:PORT",
        help="devmesh CA + xDS",
    )
    dev.add_argument(
        "--debug-listen",
        type=listen_type("127.0.0.1:15014", allow_empty=True),
        default=DEFAULT_DEBUG_LISTEN,
        metavar="HOST:PORT",
        help="devmesh debug HTTP ('' for none)",
    )
    dev.add_argument(
        "--dns-listen", type=dns_type, metavar="HOST:PORT", help="the agent's DNS proxy"
    )
    dev.add_argument(
        "--status-listen",
        type=listen_type("127.0.0.1:15020", allow_zero=False),
        metavar="HOST:PORT",
        help="the agent's status endpoint",
    )
    dev.add_argument(
        "--app-port",
        type=port_type("8080"),
        metavar="PORT",
        help="the demo app's port on 127.0.0.1",
    )
    dev.add_argument("--no-app", action="store_true", help="do not start the demo app")
    envoy = dev.add_argument_group("Envoy (see 'Envoy's ports' below)")
    for flag, what in (
        ("--envoy-admin-port", "Envoy's admin port on 127.0.0.1"),
        ("--inbound-port", "Envoy's inbound (mTLS) listener port"),
        ("--outbound-port", "Envoy's virtualOutbound listener port"),
        ("--readiness-port", "Envoy's /healthz/ready listener port"),
        ("--prometheus-port", "Envoy's /stats/prometheus listener port"),
    ):
        envoy.add_argument(flag, type=port_type("25000"), metavar="PORT", help=what)
    envoy.add_argument(
        "--outbound-bind",
        type=_address,
        default="127.0.0.2",
        metavar="ADDRESS",
        help="where the outbound HTTP listeners bind (127.0.0.2)",
    )
    envoy.add_argument("--ip", type=_address, metavar="ADDRESS", help="the VM's address")
    dev.set_defaults(run=_run_dev)


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IP address, got {text!r}") from None


def _run_dev(args: argparse.Namespace, config: Config) -> int:
    errors = (ConfigFileError, ConfigError, NodeError, ProbeSpecError, OSError, ValueError)
    return run_async("dev", run_dev(args), errors)


def find_config(given: str | None, workdir: Path) -> Path:
    """The devmesh config directory: ``given``; else ``examples/devmesh`` of the source
    checkout this module runs from; else the example shipped in the package, copied once into
    ``workdir/mesh`` so the user edits a copy of their own. Raises ValueError for a ``given``
    directory that does not exist."""
    if given:
        path = Path(given)
        if not path.is_dir():
            raise ValueError(f"devmesh config directory {path} not found (--config)")
        return path
    if CHECKOUT_CONFIG.is_dir() and (CHECKOUT_CONFIG.parents[1] / "pyproject.toml").is_file():
        return CHECKOUT_CONFIG
    copy = workdir / "mesh"
    if not copy.is_dir():
        shipped = resources.files(__package__).joinpath(PACKAGED_CONFIG)
        staging = workdir / ".mesh.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for item in shipped.iterdir():
            if item.name.endswith(".yaml"):
                (staging / item.name).write_bytes(item.read_bytes())
        staging.replace(copy)  # whole or not at all: a half copy would be a smaller mesh
    return copy


async def run_dev(args: argparse.Namespace) -> int:
    workdir = Path(args.dir).resolve()
    config_dir = find_config(args.config, workdir)
    namespace, _, group_name = args.group.partition("/")
    ip = args.ip or (usable_ips(host_addresses()) or ["127.0.0.1"])[0]
    ca_settings = DevCaSettings(
        trust_domain="cluster.local", directory=str(workdir / "devmesh"), listen=args.listen
    )
    first = load_directory(str(config_dir))
    wanted = first.group(namespace, group_name)
    if wanted is None:
        raise ValueError(f"no WorkloadGroup {args.group} in {config_dir}")
    move = app_port_move(first, wanted, args.app_port)
    dataplane = DataplaneOptions(
        capture=False,  # no iptables yet: listeners are called directly
        listen_address=ip,
        outbound_port=args.outbound_port or DataplaneOptions.outbound_port,
        inbound_port=args.inbound_port or DataplaneOptions.inbound_port,
        outbound_bind=args.outbound_bind,
        port_moves=(move,) if move else (),
    )
    settings = ControlPlaneSettings(
        config_dir=str(config_dir), debug_listen=args.debug_listen, dataplane=dataplane
    )
    problems = preflight(args, first, wanted, dataplane, workdir / "agent", ip)
    if problems:  # before anything starts: a usage error, as argparse's (exit 2)
        for problem in problems:
            print(f"vmagent dev: {problem}", file=sys.stderr)
        return 2
    async with running_devmesh(ca_settings, settings) as mesh:
        mesh_config = mesh.control_plane.state.config
        group = mesh_config.group(namespace, group_name) or wanted
        probe = app_probe(group, args.app_port)
        overrides = prepare_agent(mesh, group, probe, workdir / "agent", ip, args)
        app = None if args.no_app else await _start_demo_app(group, probe)
        try:

            def reload() -> Config:
                return load_config(
                    os.environ, overrides=overrides, cluster_env=os.devnull, flags=DEV_FLAGS
                )

            agent = build_agent(reload())
            through_envoy: list[str] = []
            if agent.config.vmagent_envoy:
                check_envoy_ports(agent.config, mesh_config, dataplane)
                app_port = int(app.address.rpartition(":")[2]) if app else None
                through_envoy = mesh_request_lines(mesh_config, group, dataplane, app_port)
            _print_banner(mesh, agent.node.id, agent.config, config_dir, app, through_envoy)
            try:
                return await serve(agent, reload)
            except OSError as exc:
                raise OSError(_with_flag(exc.strerror or str(exc), agent.config)) from None
        finally:
            if app is not None:
                await app.close()


def _with_flag(message: str, config: Config) -> str:
    """The agent's bind error, plus the ``vmagent dev`` flag that moves the port it names."""
    flags = [(address, "--dns-listen") for address in config.dns_proxy_addr]
    flags.append((config.vmagent_status_addr, "--status-listen"))
    for address, flag in flags:
        if flag in message:  # the agent's message already names the flag (Config.flags)
            return message
        port = address.rpartition(":")[2]
        if f":{port}" in message or f"port {port}" in message or f"', {port})" in message:
            return f"{message} (vmagent dev: move it with {flag} HOST:PORT)"
    return message


async def _start_demo_app(group: WorkloadGroup, probe: dict[str, Any] | None) -> DemoApp | None:
    """A stand-in for the VM's workload on the port its probe checks, so health is real. A
    port in use is fatal (exit 1 naming the port and --app-port): the probe would otherwise
    check whatever else listens there."""
    port = probe_port(probe)
    if port is None:
        return None
    return await start_demo_app(f"{group.namespace}/{group.name}", port)


def _print_banner(
    mesh: DevMesh,
    node_id: str,
    config: Config,
    config_dir: Path,
    app: DemoApp | None,
    through_envoy: list[str],
) -> None:
    dns = config.dns_proxy_addr[0].replace("localhost", "127.0.0.1")
    dns_host, _, dns_port = dns.rpartition(":")
    dig = f"dig @{dns_host} -p {dns_port}"
    me = program(sys.argv[0], sys.executable, shutil.which("vmagent"), os.getcwd())
    lines = [
        "",
        "vmagent dev: a mesh on this machine",
        f"  control plane (CA + xDS, TLS) {mesh.address}, debug {mesh.debug_url or 'off'}",
        f"  agent node {node_id}",
        f"  agent status http://{config.vmagent_status_addr}/status",
        f"  mesh config {config_dir} (edit it: the DNS proxy follows within a second)",
    ]
    if app is not None:
        lines.append(f"  demo app answering the WorkloadGroup probe on {app.address}")
    lines += [
        "",
        "Try:",
        *through_envoy,
        f"  {dig} productpage.bookinfo.svc.cluster.local",
        f"  {dig} vm-web-direct.vm.svc.cluster.local    # this VM, once registered and healthy",
        f"  {dig} anything.partner.example.com          # a wildcard ServiceEntry",
        f"  curl -s {mesh.debug_url}/debug/registry    # the WorkloadEntry and its health",
        f"  curl -s http://{config.vmagent_status_addr}/healthz/ready",
        # This agent's socket is not /run/vmagent's: `vmagent status` needs the address.
        # The command as the user can paste it: scripts/setup puts no vmagent on PATH.
        f"  {me} status --addr {config.vmagent_status_addr}",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
