"""The development control plane's mesh configuration: a directory of YAML files.

Every ``*.yaml``/``*.yml`` file directly in the directory is read (sorted by name); a file may
hold several YAML documents. Each document is a mapping with an optional default ``namespace``
and lists ``services``, ``workloadGroups`` and ``sidecars``. The schema is in
``docs/devmesh.md``. Parsing is pure (:func:`parse_document`); :func:`load_directory` reads the
files. Every error names the file and the key path, e.g.
``mesh.yaml: services[2].ports[0].port: expected an integer 1-65535, got 'http'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vmagent.devmesh.yamlread import (
    ConfigFileError as ConfigFileError,
)
from vmagent.devmesh.yamlread import (
    read_address,
    read_fail,
    read_host,
    read_integer,
    read_labels,
    read_labels_raw,
    read_list,
    read_mapping,
    read_string,
)

KUBERNETES = "Kubernetes"
EXTERNAL = "External"
RESOLUTIONS = ("STATIC", "DNS", "NONE")
PROBE_KINDS = ("httpGet", "tcpSocket", "exec", "grpc")


@dataclass(frozen=True)
class Port:
    name: str
    number: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class Endpoint:
    """A static endpoint of a service (what Kubernetes Endpoints or a ServiceEntry carry)."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    network: str = ""
    hostname: str = ""
    subdomain: str = ""
    ready: bool = True


@dataclass(frozen=True)
class Service:
    host: str
    namespace: str
    name: str
    registry: str = KUBERNETES
    addresses: tuple[str, ...] = ()
    resolution: str = "STATIC"
    ports: tuple[Port, ...] = ()
    export_to: tuple[str, ...] = ("*",)
    workload_selector: Mapping[str, str] | None = None
    endpoints: tuple[Endpoint, ...] = ()
    publish_not_ready: bool = False
    source: str = ""

    @property
    def passthrough(self) -> bool:
        """Headless (Kubernetes ``clusterIP: None``) or a ServiceEntry with resolution NONE."""
        return self.resolution == "NONE"

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*")


@dataclass(frozen=True)
class WorkloadGroup:
    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    service_account: str = ""
    ports: Mapping[str, int] = field(default_factory=dict)
    network: str = ""
    template_labels: Mapping[str, str] = field(default_factory=dict)
    locality: str = ""
    weight: int = 0
    probe: Mapping[str, Any] | None = None
    source: str = ""


@dataclass(frozen=True)
class Sidecar:
    """A namespace-wide Sidecar: which services proxies in ``namespace`` see (egress hosts)."""

    namespace: str
    egress: tuple[str, ...]
    source: str = ""


@dataclass(frozen=True)
class MeshConfig:
    services: tuple[Service, ...] = ()
    groups: tuple[WorkloadGroup, ...] = ()
    sidecars: tuple[Sidecar, ...] = ()
    files: tuple[str, ...] = ()

    def group(self, namespace: str, name: str) -> WorkloadGroup | None:
        for group in self.groups:
            if group.namespace == namespace and group.name == name:
                return group
        return None

    def sidecar(self, namespace: str) -> Sidecar | None:
        for sidecar in self.sidecars:
            if sidecar.namespace == namespace:
                return sidecar
        return None


def _port(item: Any, where: str) -> Port:
    data = read_mapping(item, where, ("name", "port", "number", "protocol", "targetPort"))
    number = data.get("port", data.get("number"))
    return Port(
        name=read_string(data.get("name"), f"{where}.name", default=f"port-{number}"),
        number=read_integer(number, f"{where}.port", 1, 65535),
        protocol=read_string(data.get("protocol"), f"{where}.protocol", default="TCP"),
    )


def _endpoint(item: Any, where: str) -> Endpoint:
    keys = ("address", "labels", "network", "hostname", "subdomain", "ready")
    data = read_mapping(item, where, keys)
    ready = data.get("ready", True)
    if not isinstance(ready, bool):
        raise read_fail(f"{where}.ready", f"expected true or false, got {ready!r}")
    return Endpoint(
        address=read_address(data.get("address"), f"{where}.address", cidr=False),
        labels=read_labels(data.get("labels"), f"{where}.labels"),
        network=read_string(data.get("network"), f"{where}.network", default=""),
        hostname=read_string(data.get("hostname"), f"{where}.hostname", default=""),
        subdomain=read_string(data.get("subdomain"), f"{where}.subdomain", default=""),
        ready=ready,
    )


SERVICE_KEYS = (
    "host", "name", "namespace", "registry", "addresses", "resolution", "ports", "exportTo",
    "workloadSelector", "endpoints", "publishNotReadyAddresses",
)  # fmt: skip


def parse_service(item: Any, where: str, namespace: str, source: str) -> Service:
    data = read_mapping(item, where, SERVICE_KEYS)
    host = read_host(data.get("host"), f"{where}.host")
    registry = read_string(data.get("registry"), f"{where}.registry", default=KUBERNETES)
    if registry not in (KUBERNETES, EXTERNAL):
        raise read_fail(f"{where}.registry", f"expected Kubernetes or External, got {registry!r}")
    if registry == KUBERNETES and host.startswith("*"):
        raise read_fail(f"{where}.host", "a Kubernetes service cannot have a wildcard host")
    addresses = tuple(
        read_address(a, f"{where}.addresses[{n}]", cidr=True)
        for n, a in enumerate(read_list(data.get("addresses"), f"{where}.addresses"))
    )
    headless = any(a in ("0.0.0.0", "::") for a in addresses)
    default_resolution = "NONE" if headless or (not addresses and host.startswith("*")) else ""
    if not default_resolution:
        default_resolution = "STATIC" if registry == KUBERNETES or addresses else "DNS"
    resolution = read_string(data.get("resolution"), f"{where}.resolution", default_resolution)
    if resolution not in RESOLUTIONS:
        raise read_fail(f"{where}.resolution", f"expected one of {', '.join(RESOLUTIONS)}")
    selector = data.get("workloadSelector")
    publish = data.get("publishNotReadyAddresses", False)
    if not isinstance(publish, bool):
        raise read_fail(
            f"{where}.publishNotReadyAddresses", f"expected true or false, got {publish!r}"
        )
    export_to = tuple(
        read_string(e, f"{where}.exportTo[{n}]")
        for n, e in enumerate(read_list(data.get("exportTo", ["*"]), f"{where}.exportTo"))
    )
    ns = read_string(data.get("namespace"), f"{where}.namespace", default=namespace or None)
    return Service(
        host=host,
        namespace=ns,
        name=read_string(data.get("name"), f"{where}.name", default=host.split(".")[0]),
        registry=registry,
        addresses=tuple(a for a in addresses if a not in ("0.0.0.0", "::")),
        resolution=resolution,
        ports=tuple(
            _port(p, f"{where}.ports[{n}]")
            for n, p in enumerate(read_list(data.get("ports"), f"{where}.ports"))
        ),
        export_to=export_to,
        workload_selector=(
            None if selector is None else read_labels(selector, f"{where}.workloadSelector")
        ),
        endpoints=tuple(
            _endpoint(e, f"{where}.endpoints[{n}]")
            for n, e in enumerate(read_list(data.get("endpoints"), f"{where}.endpoints"))
        ),
        publish_not_ready=publish,
        source=source,
    )


GROUP_KEYS = ("name", "namespace", "labels", "annotations", "serviceAccount", "template", "probe")
TEMPLATE_KEYS = ("serviceAccount", "ports", "network", "labels", "locality", "weight")


def _probe(value: Any, where: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    timing = ("initialDelaySeconds", "timeoutSeconds", "periodSeconds")
    thresholds = ("successThreshold", "failureThreshold")
    data = read_mapping(value, where, (*timing, *thresholds, *PROBE_KINDS))
    kinds = [k for k in PROBE_KINDS if k in data]
    if len(kinds) != 1:
        raise read_fail(where, f"expected exactly one of {', '.join(PROBE_KINDS)}")
    for key in (*timing, *thresholds):
        if key in data:
            read_integer(data[key], f"{where}.{key}", 0, 86400)
    kind = kinds[0]
    spec = data[kind]
    if kind == "exec":
        command = read_mapping(spec, f"{where}.exec", ("command",)).get("command")
        if not isinstance(command, list) or not command:
            raise read_fail(f"{where}.exec.command", "expected a non-empty list of strings")
    else:
        allowed = {
            "httpGet": ("path", "port", "host", "scheme", "httpHeaders"),
            "tcpSocket": ("host", "port"),
            "grpc": ("port", "service"),
        }[kind]
        port = read_mapping(spec, f"{where}.{kind}", allowed).get("port")
        read_integer(port, f"{where}.{kind}.port", 1, 65535)
    return dict(data)


def parse_group(item: Any, where: str, namespace: str, source: str) -> WorkloadGroup:
    data = read_mapping(item, where, GROUP_KEYS)
    template = read_mapping(data.get("template") or {}, f"{where}.template", TEMPLATE_KEYS)
    account = read_string(data.get("serviceAccount"), f"{where}.serviceAccount", default="")
    template_account = read_string(
        template.get("serviceAccount"), f"{where}.template.serviceAccount", default=""
    )
    if account and template_account and account != template_account:
        raise read_fail(f"{where}.serviceAccount", "differs from template.serviceAccount")
    ports = {
        key: read_integer(value, f"{where}.template.ports.{key}", 1, 65535)
        for key, value in read_labels_raw(template.get("ports"), f"{where}.template.ports").items()
    }
    return WorkloadGroup(
        name=read_string(data.get("name"), f"{where}.name"),
        namespace=read_string(
            data.get("namespace"), f"{where}.namespace", default=namespace or None
        ),
        labels=read_labels(data.get("labels"), f"{where}.labels"),
        annotations=read_labels(data.get("annotations"), f"{where}.annotations"),
        service_account=account or template_account,
        ports=ports,
        network=read_string(template.get("network"), f"{where}.template.network", default=""),
        template_labels=read_labels(template.get("labels"), f"{where}.template.labels"),
        locality=read_string(template.get("locality"), f"{where}.template.locality", default=""),
        weight=read_integer(template.get("weight", 0), f"{where}.template.weight", 0, 2**32 - 1),
        probe=_probe(data.get("probe"), f"{where}.probe"),
        source=source,
    )


def parse_sidecar(item: Any, where: str, namespace: str, source: str) -> Sidecar:
    data = read_mapping(item, where, ("namespace", "egress"))
    egress = tuple(
        read_string(h, f"{where}.egress[{n}]")
        for n, h in enumerate(read_list(data.get("egress"), f"{where}.egress"))
    )
    for n, host in enumerate(egress):
        if host.count("/") != 1:
            raise read_fail(f"{where}.egress[{n}]", f"expected 'namespace/dnsName', got {host!r}")
    ns = read_string(data.get("namespace"), f"{where}.namespace", default=namespace or None)
    return Sidecar(namespace=ns, egress=egress, source=source)


DOCUMENT_KEYS = ("namespace", "services", "workloadGroups", "sidecars")


def parse_document(document: Any, where: str, source: str) -> MeshConfig:
    """One YAML document; ``where`` prefixes error messages (file name, document index)."""
    if document is None:
        return MeshConfig()
    if not isinstance(document, Mapping):
        raise ConfigFileError(f"{where}expected a mapping with services, workloadGroups, sidecars")
    unknown = sorted(str(k) for k in document if k not in DOCUMENT_KEYS)
    if unknown:
        raise ConfigFileError(
            f"{where}{unknown[0]}: unknown key (allowed: {', '.join(DOCUMENT_KEYS)})"
        )
    data = document
    namespace = read_string(data.get("namespace"), f"{where}namespace", default="")
    sections = {k: read_list(data.get(k), f"{where}{k}") for k in ("services", "workloadGroups")}
    sidecars = read_list(data.get("sidecars"), f"{where}sidecars")
    return MeshConfig(
        services=tuple(
            parse_service(s, f"{where}services[{n}]", namespace, source)
            for n, s in enumerate(sections["services"])
        ),
        groups=tuple(
            parse_group(g, f"{where}workloadGroups[{n}]", namespace, source)
            for n, g in enumerate(sections["workloadGroups"])
        ),
        sidecars=tuple(
            parse_sidecar(s, f"{where}sidecars[{n}]", namespace, source)
            for n, s in enumerate(sidecars)
        ),
    )


def merge(parts: Sequence[MeshConfig], files: Sequence[str]) -> MeshConfig:
    """Combine documents; duplicates are errors that name both places."""
    merged = MeshConfig(
        services=tuple(s for p in parts for s in p.services),
        groups=tuple(g for p in parts for g in p.groups),
        sidecars=tuple(s for p in parts for s in p.sidecars),
        files=tuple(files),
    )
    seen: dict[tuple[str, str, str], str] = {}
    keyed = [
        *((("service", s.namespace, s.host), s.source) for s in merged.services),
        *((("workloadGroup", g.namespace, g.name), g.source) for g in merged.groups),
        *((("sidecar", s.namespace, ""), s.source) for s in merged.sidecars),
    ]
    for key, source in keyed:
        if key in seen:
            kind, namespace, name = key
            raise ConfigFileError(
                f"{source}: duplicate {kind} {namespace}/{name} (also in {seen[key]})"
            )
        seen[key] = source
    return merged


def config_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """What the poller compares: each config file's name, mtime and size."""
    out = []
    for path in config_files(directory):
        try:
            info = path.stat()
        except OSError:
            continue
        out.append((path.name, info.st_mtime_ns, info.st_size))
    return tuple(out)


def load_directory(directory: str | Path) -> MeshConfig:
    """Read and validate every config file; raise :class:`ConfigFileError` on the first problem."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigFileError(f"{folder}: not a directory")
    parts: list[MeshConfig] = []
    files = config_files(folder)
    for path in files:
        try:
            documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except OSError as exc:
            raise ConfigFileError(f"{path.name}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigFileError(f"{path.name}: invalid YAML: {exc}") from None
        for index, document in enumerate(documents):
            prefix = f"document {index + 1}: " if len(documents) > 1 else ""
            try:
                parts.append(parse_document(document, prefix, path.name))
            except ConfigFileError as exc:
                raise ConfigFileError(f"{path.name}: {exc}") from None
    return merge(parts, [p.name for p in files])
