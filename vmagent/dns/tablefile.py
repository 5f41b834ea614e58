"""A NameTable kept in a JSON file (``vmagent dns serve --name-table``): loaded at start,
reloaded when the file changes or on SIGHUP; a bad file is reported and the old table kept."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping

from vmagent.dns.table import NameInfo, NameTableError, parse_name_table

log = logging.getLogger("vmagent.dns")

Apply = Callable[[Mapping[str, NameInfo]], Awaitable[None]]


def read_name_table(path: str) -> dict[str, NameInfo]:
    """Parse the file; every problem becomes a NameTableError naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as exc:
        raise NameTableError(f"{path}: not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NameTableError(f"{path}: cannot read: {exc}") from None
    try:
        return parse_name_table(document)
    except NameTableError as exc:
        raise NameTableError(f"{path}: {exc}") from None


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

    def load_initial(self) -> dict[str, NameInfo] | None:
        """The table at start: None if the file does not exist yet; NameTableError if bad."""
        self._seen = _signature(self.path)
        if self._seen is None:
            log.warning(
                "dns: name table %s not found; forwarding every query upstream until it appears",
                self.path,
            )
            return None
        return read_name_table(self.path)

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
                table = read_name_table(self.path)
            except NameTableError as exc:
                log.error("dns: keeping the previous name table: %s", exc)
                continue
            await self._apply(table)
