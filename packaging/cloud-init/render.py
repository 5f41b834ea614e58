#!/usr/bin/env python3
"""Fill a packaging/cloud-init template's @PLACEHOLDERS@ and print the user-data.

    python3 render.py istio-files.yaml --from vm-files \\
        --set VMAGENT_PACKAGE_URL=https://example.com/vmagent_0.1.0-1_amd64.deb > user-data

A placeholder alone on its line (only indentation before it) takes a file's whole content,
every line indented like the placeholder: that is how a file goes into a YAML block scalar
(``content: |``). Anywhere else it takes a one-line value. Values are inserted once, as they
are: text in them that looks like a placeholder is not filled again.

``--from DIR`` reads istioctl's five files (``istioctl x workload entry configure -o DIR``)
as CLUSTER_ENV, MESH_YAML, ROOT_CERT_PEM, ISTIO_TOKEN and HOSTS, for the placeholders the
template has. ``--file NAME=PATH`` and ``--set NAME=VALUE`` give one each (later wins).

Exit status 0: the user-data on stdout. 2: a placeholder left without a value, a value no
placeholder takes, a missing file, or a multi-line value where one line is needed; stderr
names it. Standard library only, so it runs with any python3 >= 3.8.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")
# A placeholder that is a line's only content: group 1 the indentation, group 2 the name.
WHOLE_LINE = re.compile(r"^([ \t]*)@([A-Z][A-Z0-9_]*)@[ \t]*$", re.MULTILINE)
ISTIOCTL_FILES = {
    "CLUSTER_ENV": "cluster.env",
    "MESH_YAML": "mesh.yaml",
    "ROOT_CERT_PEM": "root-cert.pem",
    "ISTIO_TOKEN": "istio-token",
    "HOSTS": "hosts",
}


class RenderError(ValueError):
    """The template cannot be filled; the message names the placeholder and what to do."""


def placeholders(template: str) -> list[str]:
    """The placeholder names in ``template``, in order of first use."""
    return list(dict.fromkeys(PLACEHOLDER.findall(template)))


def render(template: str, values: dict[str, str]) -> str:
    """``template`` with every placeholder replaced from ``values`` (name -> text)."""
    wanted = placeholders(template)
    missing = [name for name in wanted if name not in values]
    if missing:
        raise RenderError(
            "no value for "
            + ", ".join(f"@{n}@" for n in missing)
            + ": pass --set NAME=VALUE or --file NAME=PATH (see the comments in the template)"
        )
    unused = sorted(set(values) - set(wanted))
    if unused:
        raise RenderError(
            "the template has no placeholder "
            + ", ".join(f"@{n}@" for n in unused)
            + ": check the name (placeholders: "
            + ", ".join(wanted)
            + ")"
        )

    def block(match: re.Match[str]) -> str:
        indent, name = match.group(1), match.group(2)
        lines = values[name].rstrip("\n").split("\n")
        # An empty line in a block scalar needs no indentation (and keeps no trailing blanks).
        return "\n".join(indent + line if line.strip() else "" for line in lines)

    def inline(match: re.Match[str]) -> str:
        value = values[match.group(1)].strip()
        if "\n" in value:
            raise RenderError(
                f"@{match.group(1)}@: the value has several lines but the placeholder is inside"
                " a line; give a one-line value"
            )
        return value

    # One pass over the template: inserted values are never scanned for placeholders.
    parts: list[str] = []
    last = 0
    for match in WHOLE_LINE.finditer(template):
        parts.append(PLACEHOLDER.sub(inline, template[last : match.start()]))
        parts.append(block(match))
        last = match.end()
    parts.append(PLACEHOLDER.sub(inline, template[last:]))
    return "".join(parts)


def _values(args: argparse.Namespace, template: str) -> dict[str, str]:
    values: dict[str, str] = {}
    wanted = set(placeholders(template))
    if args.source:
        source = Path(args.source)
        if not source.is_dir():
            raise RenderError(f"--from {source}: no such directory (istioctl's -o directory)")
        for name, filename in ISTIOCTL_FILES.items():
            if name in wanted:
                values[name] = _read(source / filename, f"--from {source}")
    for item in args.file:
        name, _, path = item.partition("=")
        values[name] = _read(Path(path), f"--file {item}")
    for item in args.set:
        name, _, value = item.partition("=")
        values[name] = value
    return values


def _read(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RenderError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", help="a packaging/cloud-init/*.yaml template")
    parser.add_argument("--from", dest="source", metavar="DIR", help="istioctl's output directory")
    parser.add_argument("--file", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    try:
        template = _read(Path(args.template), "template")
        sys.stdout.write(render(template, _values(args, template)))
    except RenderError as exc:
        print(f"render.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
