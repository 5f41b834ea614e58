"""A NameTable kept in a JSON file (``vmagent dns serve --name-table``): loaded at start,
reloaded when the file changes or on SIGHUP; a bad file is reported and the old table kept.

A reload must not stall queries (issue 7 §5: 100k services, ~13 MB of JSON): the file is read
on a worker thread, and its entries are decoded and checked a chunk at a time on the event
loop's thread, which answers queries between chunks (:func:`table_json_steps`). Parsing on a
worker thread instead would not help: it holds the GIL, and the loop, which gives the GIL up
at every socket call, then waits a switch interval (5 ms) to get it back, each time. Decoding
by chunks also means the whole decoded JSON document (~60 MB at 100k entries) never exists:
short-lived objects interleaved with the long-lived table would leave the heap fragmented."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from vmagent.dns.service import run_in_slices
from vmagent.dns.steps import Steps, run_steps
from vmagent.dns.table import NameInfo, NameTableError, parse_name_table

log = logging.getLogger("vmagent.dns")

Source = Callable[[], Awaitable[Mapping[str, NameInfo]]]
# Swaps in the table of a file (its path), with a way to read the table here if need be, and
# whether this is the table at start (``DnsProxy.update_from_file``); NameTableError if it
# cannot be used.
Apply = Callable[[str, Source, bool], Awaitable[None]]

CHUNK_ENTRIES = 100  # entries decoded and checked between two yields (~1 ms)


def read_name_table(path: str) -> dict[str, NameInfo]:
    """Read and parse the file at once (blocking); every problem becomes a NameTableError
    naming the file."""
    return run_steps(parse_table_steps(read_text(path), path))


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise NameTableError(f"{path}: cannot read: {exc}") from None


def parse_table_steps(text: str, path: str) -> Steps[dict[str, NameInfo]]:
    """The table in ``text`` (the contents of ``path``), a chunk at a time; every problem
    becomes a NameTableError naming the file."""
    try:
        return (yield from table_json_steps(text))
    except json.JSONDecodeError as exc:
        raise NameTableError(f"{path}: not valid JSON: {exc}") from None
    except NameTableError as exc:
        raise NameTableError(f"{path}: {exc}") from None


# Whitespace (RFC 8259 2), then a separator; after a member: a comma or the closing brace.
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
_NEXT = re.compile(r"[ \t\n\r]*(?:,[ \t\n\r]*(?=\")|(?=\}))")
_SPACE = re.compile(r"[ \t\n\r]*")
_Scan = Callable[[str, int], tuple[Any, int]]


class _Irregular(Exception):
    """Not a plain valid ``{"table": {host: entry, ...}}`` document: the exact path decides."""


def table_json_steps(text: str) -> Steps[dict[str, NameInfo]]:
    """``parse_name_table(json.loads(text))``, the same table and the same errors, with the
    entries of ``"table"`` decoded and checked ``CHUNK_ENTRIES`` at a time, yielding between
    chunks. Anything unusual (another shape, a duplicate top-level key, invalid JSON, an
    invalid entry) is left to that exact path, in one go, which raises the error it always
    raised."""
    try:
        return (yield from _streaming(text))
    except (_Irregular, IndexError, ValueError):
        return parse_name_table(json.loads(text))


def _streaming(text: str) -> Steps[dict[str, NameInfo]]:
    scan: _Scan = json.JSONDecoder().raw_decode
    pos = _end(_SPACE, text, 0)
    if text[pos] != "{":
        raise _Irregular
    top: dict[str, Any] = {}
    table: dict[str, NameInfo] | None = None
    pos = _end(_SPACE, text, pos + 1)
    if text[pos] != "}":
        while True:
            key, pos = _member_key(scan, text, pos)
            if key in top:
                raise _Irregular
            if key == "table" and text[pos] == "{":
                table, pos = yield from _entries(scan, text, pos)
                top[key] = {}  # checked below for its shape only
            else:
                top[key], pos = scan(text, pos)
            pos = _end(_NEXT, text, pos)
            if text[pos] == "}":
                break
    if _end(_SPACE, text, pos + 1) != len(text):
        raise _Irregular
    if table is None:
        return parse_name_table(top)
    parse_name_table(top)  # the document's own checks (unknown keys), first as always
    return table


def _end(pattern: re.Pattern[str], text: str, pos: int) -> int:
    match = pattern.match(text, pos)
    if match is None:
        raise _Irregular
    return match.end()


def _member_key(scan: _Scan, text: str, pos: int) -> tuple[str, int]:
    """A member's key, and where its value starts."""
    if text[pos] != '"':
        raise _Irregular
    key, pos = scan(text, pos)
    return key, _end(_COLON, text, pos)


def _entries(scan: _Scan, text: str, pos: int) -> Steps[tuple[dict[str, NameInfo], int]]:
    """The table object at ``pos``, checked a chunk at a time; and the position after it."""
    table: dict[str, NameInfo] = {}
    chunk: dict[str, Any] = {}
    pos = _end(_SPACE, text, pos + 1)
    while text[pos] != "}":
        key, pos = _member_key(scan, text, pos)
        chunk[key], pos = scan(text, pos)
        pos = _end(_NEXT, text, pos)
        if len(chunk) >= CHUNK_ENTRIES:
            table.update(_checked(chunk))
            chunk = {}
            yield
    table.update(_checked(chunk))
    return table, pos + 1


def _checked(chunk: dict[str, Any]) -> dict[str, NameInfo]:
    try:
        return parse_name_table({"table": chunk})
    except NameTableError:
        raise _Irregular from None  # the exact path reports it (and may find JSON errors first)


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class TableFile:
    def __init__(self, path: str, apply: Apply, poll_interval: float = 1.0) -> None:
        self.path = path
        self._apply = apply
        self._poll_interval = poll_interval
        self._seen: tuple[int, int, int] | None = None
        self._wake = asyncio.Event()
        self._at_start = False

    def exists_at_start(self) -> bool:
        """Whether the file is there at start (a warning if not: everything is forwarded
        until it appears)."""
        self._seen = _signature(self.path)
        if self._seen is None:
            log.warning(
                "dns: name table %s not found; forwarding every query upstream until it appears",
                self.path,
            )
            return False
        self._at_start = True
        return True

    async def apply_now(self) -> None:
        """Swap in the file's table; NameTableError if it cannot be used."""
        at_start, self._at_start = self._at_start, False
        await self._apply(self.path, self.read, at_start)

    async def read(self) -> dict[str, NameInfo]:
        """The file's table now: read on a worker thread, parsed on the event loop's thread
        a chunk at a time (:func:`run_in_slices`); NameTableError naming the file."""
        text = await asyncio.to_thread(read_text, self.path)
        return await run_in_slices(parse_table_steps(text, self.path))

    def reload_soon(self) -> None:
        """Reload now even if the file looks unchanged (SIGHUP)."""
        self._seen = None
        self._wake.set()

    async def watch(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            signature = _signature(self.path)
            if signature is None or signature == self._seen:
                continue
            self._seen = signature
            try:
                await self.apply_now()
            except NameTableError as exc:
                log.error("dns: keeping the previous name table: %s", exc)
