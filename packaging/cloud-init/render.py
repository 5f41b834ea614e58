#!/usr/bin/env python3
"""Fill a packaging/cloud-init template's @PLACEHOLDERS@ and print the user-data.

    python3 render.py istio-files.yaml --from vm-files \\
        --set VMAGENT_PACKAGE_URL=https://example.com/vmagent_0.1.0-1_amd64.deb \\
        --set VMAGENT_PACKAGE_SHA256=<64 hex digits> > user-data

A placeholder alone on its line (only indentation before it) takes a file's whole content,
every line indented like the placeholder, inside a YAML block scalar whose header render.py
gives an explicit indentation indicator (``content: |2``), so a file whose first line is
indented (or blank) stays valid. The file arrives as its text with trailing blank lines
dropped and exactly one final newline (``|`` clips). Anywhere else a placeholder takes a
one-line value, checked (VALIDATORS); in the runcmd script (SHELL_VALUES) it is single-quoted
for /bin/sh. Values are inserted once: text in them that looks like a placeholder stays.

``--from DIR`` reads istioctl's five files (``istioctl x workload entry configure -o DIR``)
as CLUSTER_ENV, MESH_YAML, ROOT_CERT_PEM, ISTIO_TOKEN and HOSTS, for the placeholders the
template has. ``--file NAME=PATH`` and ``--set NAME=VALUE`` give one each (later wins).
The template's leading comment block is left out unless ``--keep-comments``.

Exit status 0: the user-data on stdout (stderr warns above 16384 bytes, EC2's limit).
2: a placeholder without a value or with a value it does not accept, a value no placeholder
takes, a missing or non-UTF-8 file, output that does not parse back as the same YAML (when
PyYAML is installed), or output above 262144 bytes; stderr names it. Runs on the standard
library (python3 >= 3.8); PyYAML, where present, checks the output.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")
# A placeholder that is a line's only content: group 1 the indentation, group 2 the name.
WHOLE_LINE = re.compile(r"^([ \t]*)@([A-Z][A-Z0-9_]*)@[ \t]*$", re.MULTILINE)
# A block scalar's header: `key: |` (chomping optional); group 1 the key's indentation.
BLOCK_HEADER = re.compile(r"^( *)[^\s#][^\n]*:[ \t]*\|([-+]?)[ \t]*$")
ISTIOCTL_FILES = {
    "CLUSTER_ENV": "cluster.env",
    "MESH_YAML": "mesh.yaml",
    "ROOT_CERT_PEM": "root-cert.pem",
    "ISTIO_TOKEN": "istio-token",
    "HOSTS": "hosts",
}
# Files that may be empty (istioctl writes an empty hosts when no gateway IP is needed).
MAY_BE_EMPTY = {"HOSTS"}
# Placeholders inside the runcmd /bin/sh script: inserted single-quoted (shell_quote).
SHELL_VALUES = {"VMAGENT_PACKAGE_URL", "VMAGENT_PACKAGE_SHA256"}
# Sizes of user-data (bytes): EC2's limit (Azure's is 64 KiB); GCE's metadata value limit.
WARN_BYTES = 16384
MAX_BYTES = 262144
SKIP_SHA256 = "unchecked"
# vmagent/config.py CREDENTIAL_SOURCES minus JWT (that one needs istio-token).
FETCHER_TYPES = ("auto", "GoogleComputeEngine", "AWS", "Azure")


class RenderError(ValueError):
    """The template cannot be filled; the message names the placeholder and what to do."""


def _url(value: str) -> str:
    if not re.fullmatch(r"(https?|file)://[^\s'\"`\\]+", value) or not value.isprintable():
        raise RenderError(
            "@VMAGENT_PACKAGE_URL@: "
            + (repr(value) if value else "empty")
            + ": give an https://, http:// or file:// URL without spaces, quotes or backslashes"
        )
    return value


def _sha256(value: str) -> str:
    if value == SKIP_SHA256:
        return ""  # the script's `[ -n "$sha256" ]` skips the check
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise RenderError(
            "@VMAGENT_PACKAGE_SHA256@: "
            + (repr(value) if value else "empty")
            + ": give the package's SHA-256 as 64 hex digits (sha256sum FILE | cut -d' ' -f1),"
            f" or {SKIP_SHA256!r} to skip the check"
        )
    return value.lower()


def _fetcher(value: str) -> str:
    for choice in FETCHER_TYPES:
        if value.lower() == choice.lower():
            return choice
    hint = " (JWT needs istio-token: use istio-files.yaml)" if value.lower() == "jwt" else ""
    raise RenderError(
        "@CREDENTIAL_FETCHER_TYPE@: "
        + (repr(value) if value else "empty")
        + hint
        + ": give one of "
        + ", ".join(FETCHER_TYPES)
    )


VALIDATORS: dict[str, Callable[[str], str]] = {
    "VMAGENT_PACKAGE_URL": _url,
    "VMAGENT_PACKAGE_SHA256": _sha256,
    "CREDENTIAL_FETCHER_TYPE": _fetcher,
}


def shell_quote(value: str) -> str:
    """``value`` as one /bin/sh word, always in single quotes (``'`` as ``'"'"'``)."""
    return "'" + value.replace("'", "'\"'\"'") + "'"


def placeholders(template: str) -> list[str]:
    """The placeholder names in ``template``, in order of first use."""
    return list(dict.fromkeys(PLACEHOLDER.findall(template)))


def strip_header(template: str) -> str:
    """``template`` without its leading comment block (keeps the ``#cloud-config`` line)."""
    first, _, rest = template.partition("\n")
    lines = rest.split("\n")
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return first + "\n# packaging/cloud-init (render.py); docs/cloud-init.md\n\n" + "\n".join(lines)


def _block_expected(value: str) -> str:
    """What a block scalar gives back for a file's ``value``: trailing blank lines dropped,
    one final newline; empty for an empty file."""
    text = value.rstrip("\n")
    return text + "\n" if text else ""


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
    blocks = {m.group(2) for m in WHOLE_LINE.finditer(template)}
    for name in sorted(blocks):
        if not values[name].strip() and name not in MAY_BE_EMPTY:
            raise RenderError(f"@{name}@: the file is empty: give istioctl's file")
        if "\r" in values[name]:
            raise RenderError(f"@{name}@: the file has CR (DOS) line ends: convert it (dos2unix)")

    def inline(match: re.Match[str]) -> str:
        name = match.group(1)
        value = values[name].strip()
        if "\n" in value:
            raise RenderError(
                f"@{name}@: the value has several lines but the placeholder is inside"
                " a line; give a one-line value"
            )
        if name in VALIDATORS:
            value = VALIDATORS[name](value)
        return shell_quote(value) if name in SHELL_VALUES else value

    # One pass over the lines: inserted values are never scanned for placeholders.
    out: list[str] = []
    header: int | None = None  # index in `out` of the open block scalar's header line
    for line in template.split("\n"):
        whole = WHOLE_LINE.fullmatch(line)
        if whole is None:
            if BLOCK_HEADER.match(line):
                header = len(out)
            out.append(PLACEHOLDER.sub(inline, line))
            continue
        indent, name = whole.group(1), whole.group(2)
        head = BLOCK_HEADER.match(out[header]) if header is not None else None
        step = len(indent) - len(head.group(1)) if head else 0
        if head is None or "\t" in indent or not 1 <= step <= 9:
            raise RenderError(f"@{name}@: the template must put it in a `key: |` block scalar")
        # The explicit indentation indicator: a first line that starts with spaces stays content.
        assert header is not None
        out[header] = re.sub(r"\|([-+]?)[ \t]*$", rf"|{step}\1", out[header])
        lines = values[name].rstrip("\n").split("\n")
        # An empty line in a block scalar needs no indentation.
        out.extend(indent + text if text else "" for text in lines)
    return "\n".join(out)


def check_yaml(user_data: str, values: dict[str, str], template: str) -> None:
    """Parse ``user_data`` back (PyYAML, when installed) and find each file's text in it.

    Raises RenderError naming the placeholder whose text did not survive. Returns quietly
    without PyYAML (render.py stays stdlib-only; cloud-init's hosts have PyYAML)."""
    try:
        import yaml
    except ImportError:
        print("render.py: warning: PyYAML missing: output not parsed back", file=sys.stderr)
        return
    # Each file alone in a block scalar first, so a failure names the file.
    for name in dict.fromkeys(m.group(2) for m in WHOLE_LINE.finditer(template)):
        lines = values[name].rstrip("\n").split("\n")
        alone = "f: |2\n" + "\n".join("  " + text if text else "" for text in lines) + "\n"
        try:
            survived = yaml.safe_load(alone)["f"] == _block_expected(values[name])
        except yaml.YAMLError as exc:
            raise RenderError(
                f"@{name}@: the file is not valid in YAML ({str(exc).splitlines()[0]}; control"
                " characters in it?): check the file"
            ) from None
        if not survived:
            raise RenderError(
                f"@{name}@: the file's text does not survive YAML (Unicode line separators"
                " in it?): check the file"
            )
    try:
        yaml.safe_load(user_data)
    except yaml.YAMLError as exc:  # a template fault: the files alone were fine
        raise RenderError(f"the output is not valid YAML: {exc}") from None


def _values(args: argparse.Namespace, template: str) -> dict[str, str]:
    values: dict[str, str] = {}
    wanted = set(placeholders(template))
    if args.source:
        source = Path(args.source)
        if not source.is_dir():
            raise RenderError(f"--from {source}: no such directory (istioctl's -o directory)")
        for name, filename in ISTIOCTL_FILES.items():
            if name in wanted:
                values[name] = _read(source / filename, f"--from {source} (@{name}@)")
    for flag, items in (("--file", args.file), ("--set", args.set)):
        for item in items:
            name, equals, value = item.partition("=")
            if not equals or not PLACEHOLDER.fullmatch(f"@{name}@"):
                form = "NAME=PATH" if flag == "--file" else "NAME=VALUE"
                raise RenderError(f"{flag} {item}: no NAME=: give {flag} {form}")
            values[name] = (
                _read(Path(value), f"{flag} {item} (@{name}@)") if flag == "--file" else value
            )
    return values


def _read(path: Path, flag: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RenderError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise RenderError(
            f"{flag}: {path}: not UTF-8 text (byte {exc.start}); give the text file istioctl wrote"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("template", help="a packaging/cloud-init/*.yaml template")
    parser.add_argument("--from", dest="source", metavar="DIR", help="istioctl's output directory")
    parser.add_argument("--file", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--keep-comments", action="store_true", help="keep the template's leading comment block"
    )
    args = parser.parse_args(argv)
    try:
        template = _read(Path(args.template), "template")
        values = _values(args, template)
        user_data = render(template if args.keep_comments else strip_header(template), values)
        check_yaml(user_data, values, template)
        size = len(user_data.encode("utf-8"))
        if size > MAX_BYTES:
            raise RenderError(
                f"the user-data is {size} bytes, above {MAX_BYTES} (GCE's limit; EC2 takes"
                f" {WARN_BYTES}, Azure 65536): drop comments or files from it"
            )
        if size > WARN_BYTES:
            print(
                f"render.py: warning: the user-data is {size} bytes: above EC2's {WARN_BYTES}"
                " (Azure takes 65536, GCE 262144)",
                file=sys.stderr,
            )
        sys.stdout.write(user_data)
    except RenderError as exc:
        print(f"render.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
