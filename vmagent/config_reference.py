"""The configuration reference (``docs/configuration.md``), generated from the code.

Every setting comes from the fields of :class:`vmagent.config.Config` (key, default, help, and
the allowed values read from its parser by :mod:`vmagent.config_shapes`), grouped under the
comments that head each block of fields in ``config.py``; the flags that set one come from the
commands' ``flags`` maps; the variables read outside ``Config`` (``VMAGENT_CLUSTER_ENV``,
``VMAGENT_LOG_LEVEL``, the prefix variables) and the ProxyConfig fields vmagent reads come from
the constants that define them; the commands and their options from the argparse parsers
(:mod:`vmagent.command_reference`). ``vmagent config reference`` prints it;
``scripts/gen-docs`` writes it; ``tests/test_config_reference.py`` fails when the committed
file differs. Pure: no files written, nothing read but this package's source.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Mapping
from typing import Any

from vmagent.command_reference import cell, commands, render_commands
from vmagent.config import Config, env_key, settings
from vmagent.config_layers import CLUSTER_ENV_VAR, DYNAMIC_PREFIXES
from vmagent.config_shapes import describe
from vmagent.config_values import format_seconds

REGENERATE = "scripts/gen-docs"  # or: vmagent config reference > docs/configuration.md

# Limits on where a few settings may come from (config_layers.read_layers reads them before
# the later layers exist). Keys are checked against Config by the reference test.
SOURCE_NOTES = {
    "VMAGENT_CONFIG_DIR": "cluster.env itself is looked for with the value from a flag or the"
    " environment; a value in cluster.env moves only the other files",
    "VMAGENT_MESH_CONFIG": "from a flag, the environment or cluster.env (not proxyMetadata)",
    "PROXY_CONFIG": "from the environment or cluster.env (not proxyMetadata)",
}

# The variables Istio reads by prefix (config_layers.DYNAMIC_PREFIXES); the test checks that
# every prefix has a line here.
PREFIX_HELP = {
    "ISTIO_META_": "`ISTIO_META_FOO=bar`: node metadata `FOO: bar` sent to istiod"
    " (vmagent/xds/node.py)",
    "ISTIO_METAJSON_": "`ISTIO_METAJSON_LABELS={...}`: node metadata from JSON (labels,"
    " annotations); bad JSON is a configuration error",
    "CA_HEADER_": "`CA_HEADER_X_FOO=v`: gRPC metadata `x_foo: v` on every CSR to the CA",
    "XDS_HEADER_": "`XDS_HEADER_X_FOO=v`: gRPC metadata `x_foo: v` on the xDS stream",
}

# ProxyConfig fields vmagent reads (mesh.yaml's defaultConfig, PROXY_CONFIG over it), and the
# EnvoyOptions field holding the default of those handed to Envoy.
PROXY_FIELDS = {
    "discoveryAddress": ("istiod's address `HOST:PORT` (xDS, and the CA unless CA_ADDR)", ""),
    "proxyAdminPort": ("Envoy's admin port on 127.0.0.1", "admin_port"),
    "concurrency": ("Envoy's worker threads (0: one per core)", "concurrency"),
    "drainDuration": ("Envoy's `--drain-time-s` on a hot restart or drain", "drain_duration"),
    "terminationDrainDuration": (
        "how long a stop drains Envoy before it is ended",
        "termination_drain_duration",
    ),
    "binaryPath": ("Envoy binary, when ENVOY_BINARY is not set", ""),
    "readinessProbe": ("the workload's readiness probe (httpGet, tcpSocket, exec, grpc)", ""),
    "serviceCluster": ("Envoy's node cluster name", ""),
    "proxyMetadata": (
        "settings (any key of the tables above) as strings; below cluster.env in precedence",
        "",
    ),
}


def groups() -> dict[str, str]:
    """Field name -> heading of its block in ``Config``: the first line of the comment that
    follows a blank line before a field; fields without one stay in the block above."""
    source = textwrap.dedent(inspect.getsource(Config))
    lines = source.splitlines()
    (cls,) = ast.parse(source).body
    assert isinstance(cls, ast.ClassDef)
    heading, found = "Settings", {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.lineno - 2  # the line above the field (0-based)
        comment: list[str] = []
        while row >= 0 and lines[row].strip().startswith("#"):
            comment.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        if comment and (row < 0 or not lines[row].strip()):
            heading = comment[0].rstrip(".")
        found[node.target.id] = heading
    return found


def _flags_by_setting(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Setting key -> the flags that set it (``vmagent dns serve --listen``): the ``flags``
    map each command declares, and ``vmagent dev``'s."""
    from vmagent.devmesh.dev import DEV_FLAGS  # dev sets its flags through its own load

    found: dict[str, list[str]] = {}
    for words, child, _ in commands(parser):
        declared: Mapping[str, str] = child.get_default("flags") or {}
        if words == ("dev",):
            declared = {**DEV_FLAGS, **declared}
        for key, flag in declared.items():
            found.setdefault(key, []).append(f"vmagent {' '.join(words)} {flag.split()[0]}")
    return found


def _show_default(field: dataclasses.Field[Any]) -> str:
    raw = str(field.metadata["raw"])
    return f"`{raw}`" if raw else "empty"


def render_settings(parser: argparse.ArgumentParser) -> str:
    flags = _flags_by_setting(parser)
    heads = groups()
    out: list[str] = []
    current = None
    for field in settings():
        key = env_key(field)
        if heads.get(field.name) != current:
            current = heads.get(field.name)
            out += ["", f"### {current}", "", "| Setting | Default | Allowed | What it does |"]
            out.append("|---|---|---|---|")
        what = cell(field.metadata["help"])
        extra = [f"flag: {', '.join(f'`{f}`' for f in flags[key])}"] if key in flags else []
        if key in SOURCE_NOTES:
            extra.append(SOURCE_NOTES[key])
        if extra:
            what += " (" + "; ".join(extra) + ")"
        shape = cell(describe(field.metadata["parse"]))
        out.append(f"| `{key}` | {_show_default(field)} | {shape} | {what} |")
    return "\n".join(out).lstrip("\n") + "\n"


def _global_help(parser: argparse.ArgumentParser, option: str) -> tuple[argparse.Action, str]:
    action = next(a for a in parser._actions if option in a.option_strings)
    return action, cell(parser._get_formatter()._expand_help(action))


def render_other_variables(parser: argparse.ArgumentParser) -> str:
    """Variables read outside ``Config``: from the environment only."""
    from vmagent.status.journal import LEVEL_VAR, LEVELS

    _, env_help = _global_help(parser, "--cluster-env")
    level, level_help = _global_help(parser, "--log-level")
    levels = ", ".join(f"`{name}`" for name in LEVELS)
    out = [
        f"`{CLUSTER_ENV_VAR}` and `{LEVEL_VAR}` are read from the process environment only"
        " (not from cluster.env, which is found and read after logging is set up). The"
        " prefix variables, which Istio reads by prefix, come from every layer above.",
        "",
        "| Variable | Default | Allowed | What it does |",
        "|---|---|---|---|",
        f"| `{CLUSTER_ENV_VAR}` | empty | path of an existing file | the cluster.env to read;"
        f" flag `--cluster-env FILE` wins: {env_help} |",
        f"| `{LEVEL_VAR}` | `{level.default}` | one of {levels} (any case) | the agent's log"
        f" level; flag `--log-level` wins ({level_help}); a bad value is a configuration"
        " error (exit 2) |",
    ]
    for prefix in DYNAMIC_PREFIXES:
        help_text = PREFIX_HELP[prefix]
        out.append(f"| `{prefix}*` | | text | {help_text}; also from cluster.env and"
                   " proxyMetadata |")  # fmt: skip
    return "\n".join(out) + "\n"


def render_proxy_config() -> str:
    """ProxyConfig fields: bounds from :mod:`vmagent.proxyconfig`, Envoy's defaults from
    :class:`vmagent.envoy.options.EnvoyOptions`."""
    from vmagent import proxyconfig
    from vmagent.envoy.options import EnvoyOptions

    defaults = {f.name: f.default for f in dataclasses.fields(EnvoyOptions)}
    out = ["| Field | Default | Allowed | What it does |", "|---|---|---|---|"]
    for key, (what, option) in PROXY_FIELDS.items():
        default: Any = defaults.get(option) if option else None
        allowed = ""
        if key in proxyconfig._WHOLE_NUMBERS:
            low, high = proxyconfig._WHOLE_NUMBERS[key]
            allowed = f"whole number, {low} to {high}"
        elif key in proxyconfig._DURATIONS:
            allowed = f"duration, at most {format_seconds(proxyconfig._DURATIONS[key])}"
            default = format_seconds(default) if isinstance(default, float) else default
        if key == "discoveryAddress":
            default, allowed = proxyconfig.DEFAULT_DISCOVERY_ADDRESS, "`HOST:PORT`"
        shown = "Envoy's own" if option and default is None else f"`{default}`" if default else ""
        out.append(f"| `{key}` | {shown} | {allowed} | {cell(what)} |")
    return "\n".join(out) + "\n"


HEADER = """\
# Configuration reference

<!-- Generated from the code by `vmagent config reference` ({regenerate}); do not edit.
     tests/test_config_reference.py fails when this file differs from a fresh run. -->

One immutable configuration, read once at start (and again on SIGHUP). Each setting below may
be given, highest first, by:

1. a command's flag, where one is listed (`vmagent dns serve --listen`);
2. the environment (`DNS_PROXY_ADDR=127.0.0.1:15053 vmagent run`; the systemd unit's
   `Environment=` / `EnvironmentFile=`);
3. `cluster.env`, as `istioctl x workload entry configure` writes it (`KEY='value'` lines):
   `--cluster-env FILE`, else `$VMAGENT_CLUSTER_ENV`, else `<VMAGENT_CONFIG_DIR>/cluster.env`,
   else Istio's `/var/lib/istio/envoy/cluster.env`;
4. `proxyMetadata` of `PROXY_CONFIG` (YAML), then of mesh.yaml's `defaultConfig`;
5. the default.

`vmagent config show` prints every setting's effective value and where it came from. Every
value is checked when the configuration is loaded; a bad one is an error naming the key, its
source and what is allowed, and `vmagent run` exits 2. Unknown keys are ignored. Shapes used
below: *boolean* is Go's `strconv.ParseBool` (`true`/`false`, `1`/`0`, `t`/`f`, `TRUE`/`FALSE`,
`True`/`False`), as Istio reads its variables; *duration* is Go's syntax (`500ms`, `5s`,
`1m30s`, `24h`) or a bare number of seconds; a *list* is comma- or space-separated.

## Settings
"""


def reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole ``docs/configuration.md``; ``parser``: the command line (default: every
    command's, :func:`vmagent.cli.build_parser`)."""
    if parser is None:
        from vmagent.cli import build_parser

        parser = build_parser()
    settings_by_flag = {
        flag.removeprefix("vmagent "): key
        for key, found in _flags_by_setting(parser).items()
        for flag in found
    }
    return "\n".join(
        [
            HEADER.format(regenerate=REGENERATE),
            render_settings(parser),
            "## Variables read outside the settings",
            "",
            render_other_variables(parser),
            "## ProxyConfig (mesh.yaml `defaultConfig`, `PROXY_CONFIG`)",
            "",
            "`PROXY_CONFIG`'s fields replace mesh.yaml's; `proxyMetadata` maps merge key by key,"
            " as pilot-agent does. The whole document is also sent to istiod as node metadata.",
            "",
            render_proxy_config(),
            render_commands(parser, settings_by_flag),
        ]
    )


CONFIGURATION_MD = "docs/configuration.md"
TROUBLESHOOTING_MD = "docs/troubleshooting.md"


def documents(troubleshooting: str) -> dict[str, str]:
    """Path (relative to the checkout) -> the text it must have; ``troubleshooting``: the
    current docs/troubleshooting.md, whose generated block is replaced (ValueError without
    its markers)."""
    from vmagent.troubleshooting_reference import render_problems, replace_block

    return {
        CONFIGURATION_MD: reference(),
        TROUBLESHOOTING_MD: replace_block(troubleshooting, render_problems()),
    }


def main() -> None:
    """``scripts/gen-docs``: rewrite the generated docs of the checkout in the working
    directory."""
    from pathlib import Path

    current = Path(TROUBLESHOOTING_MD).read_text(encoding="utf-8")
    for path, text in documents(current).items():
        Path(path).write_text(text, encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
