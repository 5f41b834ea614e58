"""``vmagent dev``'s data plane helpers: which request the banner shows, and a check that
Envoy's ports are free before Envoy starts (Envoy itself only logs a port it cannot bind and
never becomes ready)."""

from __future__ import annotations

from vmagent.config import Config
from vmagent.devmesh.dataplane_model import DataplaneOptions, PortMove, is_http
from vmagent.devmesh.demoapp import WHOAMI
from vmagent.devmesh.dev_ports import Listener
from vmagent.devmesh.server import bind_error
from vmagent.devmesh.services import MeshConfig, Port, Service, WorkloadGroup
from vmagent.envoy import envoy_options
from vmagent.envoy.ports import listen_blocked


def mesh_port(config: MeshConfig, group: WorkloadGroup) -> tuple[Service, Port] | None:
    """The first HTTP port of a service with a VIP that selects ``group``'s workloads: the one
    the banner's request goes through (headless and wildcard services get no listener)."""
    labels = {**group.template_labels, **group.labels}
    for service in config.services:
        selector = service.workload_selector
        if selector is None or service.namespace != group.namespace:
            continue
        if service.wildcard or service.resolution != "STATIC" or not service.addresses:
            continue
        if all(labels.get(k) == v for k, v in selector.items()):
            for port in service.ports:
                if is_http(port):
                    return service, port
    return None


def app_port_move(
    config: MeshConfig, group: WorkloadGroup, app_port: int | None
) -> PortMove | None:
    """``--app-port``: the group's workload port the demo app stood for (its probe's port,
    else the banner service's target port) moves to ``app_port``, so Envoy's inbound
    forwards where the app listens and the banner's request works unchanged."""
    if app_port is None:
        return None
    old: int | None = None
    for kind in ("httpGet", "http_get", "tcpSocket", "tcp_socket"):
        check = (group.probe or {}).get(kind)
        if isinstance(check, dict) and isinstance(check.get("port"), int):
            old = int(check["port"])
            break
    if old is None:
        found = mesh_port(config, group)
        old = group.ports.get(found[1].name, found[1].number) if found else None
    if old is None or old == app_port:
        return None
    return PortMove(group.namespace, group.name, old, app_port)


def envoy_listeners(
    config: Config, mesh: MeshConfig, dataplane: DataplaneOptions
) -> list[Listener]:
    """Every port Envoy binds in ``vmagent dev``, with the flag that moves it: admin, inbound,
    outbound, readiness and Prometheus (these two on every address), and one outbound HTTP
    listener per service port on ``--outbound-bind``."""
    opts = envoy_options(config)
    address = dataplane.listen_address
    found = [
        Listener("Envoy admin", "--envoy-admin-port", "127.0.0.1", opts.admin_port),
        Listener("Envoy inbound", "--inbound-port", address, dataplane.inbound_port),
        Listener("Envoy outbound", "--outbound-port", address, dataplane.outbound_port),
        Listener("Envoy readiness", "--readiness-port", None, opts.readiness_port),
        Listener("Envoy prometheus", "--prometheus-port", None, opts.prometheus_port),
    ]
    http_ports = sorted({
        port.number
        for service in mesh.services
        if service.resolution == "STATIC" and not service.wildcard
        for port in service.ports
        if is_http(port)
    })  # fmt: skip
    bind = dataplane.outbound_bind
    found += [Listener("Envoy outbound HTTP", "--outbound-bind", bind, p) for p in http_ports]
    return found


def check_envoy_ports(config: Config, mesh: MeshConfig, dataplane: DataplaneOptions) -> None:
    """Envoy would only log a port it cannot bind (and never become ready): check them first.
    Raises OSError with one line naming the address and the flag that moves it."""
    for listener in envoy_listeners(config, mesh, dataplane):
        host = listener.host or "127.0.0.1"  # the wildcard ones: in use on loopback is enough
        exc = listen_blocked(host, listener.port)
        if exc is not None:
            where = f"[{host}]:{listener.port}" if ":" in host else f"{host}:{listener.port}"
            metavar = "ADDRESS" if listener.flag == "--outbound-bind" else "PORT"
            raise OSError(bind_error(where, listener.what, f"{listener.flag} {metavar}", exc))


def mesh_request(host: str, bind: str, port: int) -> str:
    """The banner's one command: through Envoy's outbound listener, Istio mTLS to the inbound
    listener, to the demo app's ``/whoami``, which prints the caller's identity."""
    if ":" in bind:  # -g: curl would read the brackets of an IPv6 literal as a glob
        return f"curl -s -g -H 'Host: {host}' http://[{bind}]:{port}{WHOAMI}"
    return f"curl -s -H 'Host: {host}' http://{bind}:{port}{WHOAMI}"


def mesh_request_lines(
    config: MeshConfig, group: WorkloadGroup, dataplane: DataplaneOptions, app_port: int | None
) -> list[str]:
    """The banner's lines for the request through Envoy to the demo app on ``app_port`` (None:
    no demo app), or one line saying why there is none."""
    found = mesh_port(config, group)
    if found is None:
        return ["  (no service with a VIP and an HTTP port selects the group: no mesh request)"]
    service, port = found
    lines = [
        f"  {mesh_request(service.host, dataplane.outbound_bind, port.number)}",
        "      # through Envoy, Istio mTLS, Envoy again, to the demo app: prints the SPIFFE ID"
        " the app saw",
    ]
    target = group.ports.get(port.name, port.number)
    if app_port is not None and app_port != target:
        lines.append(
            f"      # but Envoy forwards it to 127.0.0.1:{target} (the group's template port "
            f"{port.name!r}), not to the demo app's {app_port}: set template.ports.{port.name}: "
            f"{app_port} in {group.source or 'the config'}"
        )
    return lines
