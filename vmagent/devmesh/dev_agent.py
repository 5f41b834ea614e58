"""``vmagent dev``'s agent: the settings an onboarded VM would have (files, and the
cluster.env keys istioctl writes, as ``load_config`` overrides), and the check, before
anything starts, that the agent's configuration loads and no two listeners of the whole run
(devmesh, demo app, agent, Envoy) share a port."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from vmagent.config import ConfigError, load_config
from vmagent.config_values import split_host_port
from vmagent.devmesh.dataplane_model import DataplaneOptions
from vmagent.devmesh.dev_envoy import envoy_listeners
from vmagent.devmesh.dev_ports import Listener, clashes, split
from vmagent.devmesh.serve import DevMesh
from vmagent.devmesh.services import MeshConfig, WorkloadGroup
from vmagent.identity.store import atomic_write

# Settings `vmagent dev`'s flags move, with the flags' spelling (configuration errors name them).
DEV_FLAGS = {
    "DNS_PROXY_ADDR": "--dns-listen HOST:PORT",
    "VMAGENT_STATUS_ADDR": "--status-listen HOST:PORT",
    "VMAGENT_ENVOY_READINESS_PORT": "--readiness-port PORT",
    "VMAGENT_ENVOY_PROMETHEUS_PORT": "--prometheus-port PORT",
}


def preflight(
    args: argparse.Namespace,
    mesh_config: MeshConfig,
    group: WorkloadGroup,
    dataplane: DataplaneOptions,
    home: Path,
    ip: str,
) -> list[str]:
    """What would fail once started, said before anything starts: the agent's configuration
    (its own checks, a port used twice among its listeners included) and a port used twice
    by any two listeners of the whole run (devmesh, demo app, agent, Envoy)."""
    probe = app_probe(group, args.app_port)
    host, port = split(args.listen)
    # Port 0: the kernel picks the control plane's port at start; any port checks the rest.
    ca_address = args.listen if port else f"[{host}]:15012" if ":" in host else f"{host}:15012"
    overrides = agent_overrides(args, group, probe, home, ip, ca_address)
    try:
        config = load_config(
            os.environ, overrides=overrides, cluster_env=os.devnull, flags=DEV_FLAGS
        )
    except ConfigError as exc:
        return [str(exc)]
    found = [Listener("devmesh CA + xDS", "--listen", *split(args.listen))]
    if args.debug_listen:
        found.append(Listener("devmesh debug HTTP", "--debug-listen", *split(args.debug_listen)))
    app_port = None if args.no_app else probe_port(probe)
    if app_port is not None:
        found.append(Listener("demo app", "--app-port", "127.0.0.1", app_port))
    found.append(Listener("agent status", "--status-listen", *split(config.vmagent_status_addr)))
    for item in config.dns_proxy_addr:
        dns_host, dns_port = split_host_port(item, 53)
        found.append(Listener("agent DNS proxy", "--dns-listen", dns_host, dns_port or 53))
    if config.vmagent_envoy:
        found += envoy_listeners(config, mesh_config, dataplane)
    return clashes(found)


def app_probe(group: WorkloadGroup, app_port: int | None) -> dict[str, Any] | None:
    """The readiness probe the agent runs: the group's, with its port moved to ``app_port``
    (httpGet / tcpSocket), so the demo app and the probe meet on the port the user chose."""
    if group.probe is None:
        return None
    probe: dict[str, Any] = json.loads(json.dumps(dict(group.probe)))  # a deep, plain copy
    if app_port is not None:
        for kind in ("httpGet", "http_get", "tcpSocket", "tcp_socket"):
            if isinstance(probe.get(kind), dict):
                probe[kind]["port"] = app_port
    return probe


def prepare_agent(
    mesh: DevMesh,
    group: WorkloadGroup,
    probe: dict[str, Any] | None,
    home: Path,
    ip: str,
    args: argparse.Namespace,
) -> dict[str, str]:
    """Files and settings an onboarded VM would have: root cert, bootstrap token, and the
    cluster.env keys istioctl writes (as overrides, so the user's env cannot leak in), plus
    the ports the command line moved."""
    etc, state, run = home / "etc", home / "state", home / "run"
    for directory in (etc, state, run):
        directory.mkdir(parents=True, exist_ok=True)
    service_account = group.service_account or "default"
    token = mesh.ca.authority.mint_token(group.namespace, service_account, time.time())
    atomic_write(etc / "istio-token", token.encode(), 0o600)
    shutil.copyfile(mesh.root_cert, etc / "root-cert.pem")
    return agent_overrides(args, group, probe, home, ip, mesh.address)


def agent_overrides(
    args: argparse.Namespace,
    group: WorkloadGroup,
    probe: dict[str, Any] | None,
    home: Path,
    ip: str,
    ca_address: str,
) -> dict[str, str]:
    """The agent's settings (``load_config`` overrides) for ``home`` (its etc/state/run)."""
    etc, state, run = home / "etc", home / "state", home / "run"
    service_account = group.service_account or "default"
    proxy_config: dict[str, Any] = {"discoveryAddress": ca_address}
    if probe:
        proxy_config["readinessProbe"] = probe
    if args.envoy_admin_port:
        proxy_config["proxyAdminPort"] = args.envoy_admin_port
    # Ctrl-C should not wait Istio's 5 s for connections to drain from a demo app.
    proxy_config["terminationDrainDuration"] = "1s"
    moved = {
        "DNS_PROXY_ADDR": args.dns_listen,
        "VMAGENT_STATUS_ADDR": args.status_listen,
        "VMAGENT_ENVOY_READINESS_PORT": args.readiness_port and str(args.readiness_port),
        "VMAGENT_ENVOY_PROMETHEUS_PORT": args.prometheus_port and str(args.prometheus_port),
    }
    return {k: v for k, v in moved.items() if v} | {
        "VMAGENT_CONFIG_DIR": str(etc),
        "VMAGENT_STATE_DIR": str(state),
        "VMAGENT_RUN_DIR": str(run),
        "VMAGENT_MESH_CONFIG": os.devnull,
        "OUTPUT_CERTS": str(state / "certs"),
        "CREDENTIAL_FETCHER_TYPE": "JWT",
        "VMAGENT_TOKEN_FILE": str(etc / "istio-token"),
        "CA_ADDR": ca_address,
        "ISTIOD_SAN": "istiod.istio-system.svc",
        "PROXY_CONFIG": json.dumps(proxy_config),
        "POD_NAMESPACE": group.namespace,
        "SERVICE_ACCOUNT": service_account,
        "TRUST_DOMAIN": "cluster.local",
        "ISTIO_SVC_IP": ip,
        "ISTIO_META_AUTO_REGISTER_GROUP": group.name,
        "ISTIO_META_DNS_CAPTURE": "true",
        "VMAGENT_CAPTURE": "false",  # the no-capture data plane: no iptables on the host
        "ISTIO_META_CLUSTER_ID": "Kubernetes",
        "ISTIO_META_WORKLOAD_NAME": group.name,
        "ISTIO_METAJSON_LABELS": json.dumps(dict(group.labels)),
    }


def probe_port(probe: dict[str, Any] | None) -> int | None:
    """The port an httpGet / tcpSocket probe checks: where the demo app listens."""
    check = (probe or {}).get("httpGet") or (probe or {}).get("http_get")
    check = check or (probe or {}).get("tcpSocket") or (probe or {}).get("tcp_socket")
    if not isinstance(check, dict) or not check.get("port"):
        return None
    return int(check["port"])
