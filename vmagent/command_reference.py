"""Every command of the ``vmagent`` command line and its options, as markdown, read from the
argparse parsers :func:`vmagent.cli.build_parser` builds (so the reference lists exactly the
flags the program accepts, with their help text). Pure: a parser in, text out.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping

Command = tuple[tuple[str, ...], argparse.ArgumentParser, str]  # (words, parser, one-line help)


def cell(text: str) -> str:
    """``text`` fit for one markdown table cell: one line, ``|`` escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Command]:
    """Every command and subcommand under ``parser``, depth first, in registration order."""
    for action in parser._actions:  # argparse keeps no public list of subparsers
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: str(choice.help or "") for choice in action._choices_actions}
        seen: list[argparse.ArgumentParser] = []
        for name, child in action.choices.items():
            if any(child is other for other in seen):  # an alias shares its parser
                continue
            seen.append(child)
            yield (*path, name), child, helps.get(name, "")
            yield from commands(child, (*path, name))


def is_group(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def _own_options(parser: argparse.ArgumentParser, skip: frozenset[str]) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and action.help is not argparse.SUPPRESS
        and not (set(action.option_strings) & skip)
    ]


def _default(action: argparse.Action, help_text: str) -> str:
    """`` (default: X)`` when the help does not say it already and X means something."""
    value = action.default
    if action.required or value in (None, False, argparse.SUPPRESS, [], ""):
        return ""
    if "default" in help_text.lower() or str(value) in help_text:
        return ""
    return f" (default: `{value}`)"


def option_rows(
    parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """(invocation, help) for each option and argument of ``parser`` except ``-h`` and the
    options named in ``skip``; help as ``--help`` prints it (``%(default)s`` expanded)."""
    formatter = parser._get_formatter()
    rows = []
    for action in _own_options(parser, skip):
        invocation = formatter._format_action_invocation(action)
        text = formatter._expand_help(action) if action.help else ""
        if action.required and action.option_strings:
            text += " (required)"
        rows.append((invocation, text + _default(action, text)))
    return rows


def _table(rows: list[tuple[str, str]]) -> list[str]:
    lines = ["| Option | Meaning |", "|---|---|"]
    lines += [f"| `{cell(flag)}` | {cell(text)} |" for flag, text in rows]
    return lines


def render_commands(
    parser: argparse.ArgumentParser, settings_by_flag: Mapping[str, str] | None = None
) -> str:
    """The ``## Commands`` part of the reference: the global options once, then each command
    with its help, description and own options. ``settings_by_flag``: ``"dns serve --listen"``
    -> ``DNS_PROXY_ADDR``, to link a flag to the setting it overrides."""
    settings_by_flag = settings_by_flag or {}
    global_rows = option_rows(parser)
    skip = frozenset(
        word for action in _own_options(parser, frozenset()) for word in action.option_strings
    )
    out = [
        "## Commands",
        "",
        "Options every command takes, before or after the command's name"
        " (`vmagent --log-level debug run` = `vmagent run --log-level debug`):",
        "",
        *_table(global_rows),
    ]
    for words, child, summary in commands(parser):
        name = " ".join(words)
        out += ["", f"### `vmagent {name}`", ""]
        description = cell(child.description or "")
        out.append(cell(summary) + ("." if summary and not summary.endswith(".") else ""))
        if description and description != cell(summary):
            out += ["", description]
        if is_group(child):
            subs = [f"`{w[0]}`" for w, _, _ in commands(child) if len(w) == 1]
            out += ["", "Subcommands: " + ", ".join(subs) + "."]
        rows = []
        for flag, text in option_rows(child, skip):
            setting = settings_by_flag.get(f"{name} {flag.split()[0]}")
            rows.append((flag, text + (f" (sets `{setting}`)" if setting else "")))
        if rows:
            out += ["", *_table(rows)]
        if child.epilog:  # preformatted (RawDescriptionHelpFormatter): shown as written
            out += ["", "```text", child.epilog.strip("\n"), "```"]
    return "\n".join(out) + "\n"
