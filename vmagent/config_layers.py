"""The layers a configuration is read from, each with the label its errors cite.

Highest first: command-line overrides (``flag``, or ``flag --listen`` when the command names
its flags), the process environment (``env``), cluster.env (``file:PATH``), ``PROXY_CONFIG``'s
``proxyMetadata`` (``env PROXY_CONFIG``, or ``PROXY_CONFIG from file:PATH`` when cluster.env
sets it), mesh.yaml's ``proxyMetadata`` (``mesh:PATH``). A label always names where the value
was written: a key from PROXY_CONFIG is never blamed on a mesh.yaml that may not exist.
Reads files; no other side effects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vmagent.config_checks import FLAG, Names, cross_checks, flag_source
from vmagent.config_paths import CLUSTER_ENV, MESH_CONFIG, ROOT_CERT, TOKEN, FoundFile, locate
from vmagent.config_values import ConfigError, parse_env_file, read_optional
from vmagent.proxyconfig import (
    ProxyConfig,
    ProxyConfigError,
    merge,
    parse_mesh_config,
    parse_proxy_config_env,
)

CLUSTER_ENV_VAR = "VMAGENT_CLUSTER_ENV"
Layer = tuple[str, Mapping[str, str]]  # (label, key -> raw value)


@dataclasses.dataclass(frozen=True)
class Layers:
    """``layers`` highest first; ``discovery``: where ``discoveryAddress`` came from."""

    layers: list[Layer]
    proxy_config: ProxyConfig
    env_file: FoundFile
    mesh_file: FoundFile
    discovery: str

    def lookup(self, key: str, flags: Mapping[str, str]) -> tuple[str, str] | None:
        """(label, raw) of the highest layer that sets ``key``."""
        for label, layer in self.layers:
            if key in layer:
                return (flag_source(key, flags) if label == FLAG else label), layer[key]
        return None


def read_layers(
    environ: Mapping[str, str],
    overrides: Mapping[str, str],
    cluster_env: str | Path | None,
    root: str | Path,
    default: Callable[[str], str],
    flags: Mapping[str, str],
) -> Layers:
    """Locate and read cluster.env and the mesh config, parse PROXY_CONFIG. ``default(key)``
    is a setting's default (for ``VMAGENT_CONFIG_DIR`` and friends). ConfigError names the
    file or variable that cannot be read or parsed."""
    layers: list[Layer] = [(FLAG, overrides), ("env", environ)]

    def first(key: str) -> tuple[str, str]:
        for label, layer in layers:
            if key in layer:
                return (flag_source(key, flags) if label == FLAG else label), layer[key]
        return "default", default(key)

    explicit: tuple[str, str] | None = None
    if cluster_env is not None:
        explicit = (str(cluster_env), "--cluster-env")
    elif CLUSTER_ENV_VAR in environ:
        explicit = (environ[CLUSTER_ENV_VAR], CLUSTER_ENV_VAR)
    env_file = locate(CLUSTER_ENV, first("VMAGENT_CONFIG_DIR")[1], explicit, root)
    text = read_optional(env_file, explicit is not None, "cluster.env file")
    layers.append((f"file:{env_file.path}", parse_env_file(text, env_file.path) if text else {}))

    config_dir = first("VMAGENT_CONFIG_DIR")[1]
    mesh_name = first("VMAGENT_MESH_CONFIG")[1]
    mesh_file = locate(
        MESH_CONFIG, config_dir, (mesh_name, "VMAGENT_MESH_CONFIG") if mesh_name else None, root
    )
    proxy_origin, proxy_text = first("PROXY_CONFIG")
    # "env PROXY_CONFIG" (the wording), else e.g. "PROXY_CONFIG from file:cluster.env".
    proxy_label = (
        f"{proxy_origin} PROXY_CONFIG"
        if proxy_origin == "env"
        else f"PROXY_CONFIG from {proxy_origin}"
    )
    try:
        mesh_text = read_optional(mesh_file, bool(mesh_name), "mesh config")
        base = parse_mesh_config(mesh_text, mesh_file.path) if mesh_text is not None else {}
        overlay = parse_proxy_config_env(proxy_text, proxy_label)
    except ProxyConfigError as exc:
        raise ConfigError(str(exc)) from None
    proxy_config = merge(base, overlay)  # PROXY_CONFIG over mesh.yaml, as pilot-agent does
    mesh_label = f"mesh:{mesh_file.path}"
    layers.append((proxy_label, overlay.get("proxyMetadata") or {}))
    layers.append((mesh_label, base.get("proxyMetadata") or {}))
    if "discoveryAddress" in overlay:
        discovery = proxy_label
    elif "discoveryAddress" in base:
        discovery = mesh_label
    else:
        discovery = "default"
    return Layers(layers, proxy_config, env_file, mesh_file, discovery)


DYNAMIC_PREFIXES = ("ISTIO_META_", "ISTIO_METAJSON_", "CA_HEADER_", "XDS_HEADER_")


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Parsed values by field name, sources by key, prefix-read keys, files looked for."""

    values: dict[str, Any]
    sources: dict[str, str]
    dynamic: dict[str, str]
    files: tuple[FoundFile, ...]
    proxy_config: ProxyConfig


def resolve(
    read: Layers,
    specs: Sequence[tuple[str, str, Callable[[str], Any]]],
    default: Callable[[str], str],
    flags: Mapping[str, str],
    root: str | Path,
) -> Resolved:
    """Parse every setting of ``specs`` (key, field name, parser) from the highest layer that
    sets it, derive the defaults that follow other settings (``CA_ADDR`` = discoveryAddress,
    ``OUTPUT_CERTS`` = ``<VMAGENT_STATE_DIR>/certs``, ``XDS_ROOT_CA`` and
    ``VMAGENT_TOKEN_FILE`` = the located root-cert.pem / istio-token), then check the rules
    between settings. ConfigError lists every problem, each naming its key and source."""
    dynamic: dict[str, str] = {}
    for _, layer in reversed(read.layers):
        dynamic.update((k, v) for k, v in layer.items() if k.startswith(DYNAMIC_PREFIXES))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    names = Names(sources, flags)
    problems: list[str] = []
    for key, name, parse in specs:
        found = read.lookup(key, flags)
        if found is None:
            sources[key] = "default"
            continue
        sources[key], raw = found
        try:
            values[name] = parse(raw)
        except ValueError as exc:
            problems.append(f"{names.value(key, raw)}: {exc}")

    def derive(key: str, value: str, source: str) -> None:
        if sources[key] == "default":
            values[key.lower()], sources[key] = value, source

    proxy_config = read.proxy_config
    sources["discoveryAddress"] = read.discovery
    derive("CA_ADDR", proxy_config.discovery_address, f"{read.discovery} discoveryAddress")
    state_dir = values.get("vmagent_state_dir", default("VMAGENT_STATE_DIR"))
    derive("OUTPUT_CERTS", str(Path(state_dir) / "certs"), "default: <VMAGENT_STATE_DIR>/certs")
    config_dir = values.get("vmagent_config_dir", default("VMAGENT_CONFIG_DIR"))
    files = [read.env_file, read.mesh_file]
    for key, role in (("XDS_ROOT_CA", ROOT_CERT), ("VMAGENT_TOKEN_FILE", TOKEN)):
        given = values.get(key.lower()) if sources[key] != "default" else None
        if given and given.upper() == "SYSTEM":
            files.append(FoundFile(role, given, f"explicit: {key}, the OS trust store", True))
            continue
        found_file = locate(role, config_dir, (given, key) if given else None, root)
        files.append(found_file)
        derive(key, found_file.path, f"default: {found_file.how}")
        if given and not found_file.exists and key == "XDS_ROOT_CA":
            problems.append(_missing_root(names.value(key, given)))
        # An explicit VMAGENT_TOKEN_FILE that is missing stays a warning (logged when the CSR
        # is sent): Istio's pilot-agent, too, only warns and sends no token, and a token
        # projector may write it after the agent starts.
    ca_root: str = values.get("ca_root_ca") or ""
    explicit = sources["CA_ROOT_CA"] != "default" and ca_root.upper() not in ("", "SYSTEM")
    if explicit and not locate(ROOT_CERT, config_dir, (ca_root, "CA_ROOT_CA"), root).exists:
        problems.append(_missing_root(names.value("CA_ROOT_CA", ca_root)))
    if not problems:  # the rules between settings need every value parsed
        problems += cross_checks(values, names, proxy_config.document)
    if problems:
        raise ConfigError("\n  ".join(problems))
    return Resolved(values, sources, dynamic, tuple(files), proxy_config)


def _missing_root(named: str) -> str:
    """An explicitly named root certificate that does not exist: a permanent mistake (retrying
    cannot help), unlike a missing default root-cert.pem that onboarding may still copy in."""
    return (
        f"{named}: file not found; copy the mesh's root-cert.pem there, fix the path, or unset "
        "it to use <VMAGENT_CONFIG_DIR>/root-cert.pem"
    )
