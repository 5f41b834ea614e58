"""Building a table file's lookup in a child process (``python -m vmagent.dns.tablebuild``).

Why a child: a 100k-service table takes ~2 s of CPU and ~150 MB of short-lived objects to
parse and expand (issue 7 §5). In the proxy's own process that work either runs on the event
loop's thread (in slices, ~35 ms waits) or on a worker thread that holds the GIL (the loop
then waits a switch interval at every socket call), and its short-lived objects, interleaved
with what the loop allocates meanwhile, leave the heap fragmented: RSS grew by ~8-40 MB per
swap, measured. The child runs on another CPU, and hands back the lookup as the few flat
buffers of a :class:`~vmagent.dns.nameindex.NameIndex` (~17 MB at 300k names), which the
proxy copies in with a handful of C calls.

Protocol, on the child's stdout: ``L`` + entries (8 bytes) + answered names (8 bytes) + the
search domain's length (1 byte) and wire form + the index's bytes; or ``E`` + the
NameTableError message (UTF-8), for a table that cannot be used. Arguments: the table file,
the proxy's namespace, the cluster domain, then the search list.
``FILE`` ``-``: the table is a serialized NameTable protobuf on stdin (an NDS push: decoded and
checked here, off the agent's process). ``--persist PATH`` first: after the lookup is sent and
stdout closed, the table is also written to ``PATH`` as JSON (the agent's persisted table);
a failure there is exit status 3 and a message on stderr. ``--json`` alone: stdin's NameTable
to its JSON document on stdout (``/debug/ndsz``)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import os
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from vmagent.dns.nameindex import NameIndex
from vmagent.dns.table import (
    Lookup,
    NameInfo,
    NameTableError,
    TableScope,
    build_lookup,
    parse_name_table,
)

_HEAD = struct.Struct("!QQB")
PERSIST_FAILED = 3  # the child's exit status when only writing the --persist file failed

log = logging.getLogger("vmagent.dns")


class BuilderFailed(RuntimeError):
    """The child could not run or gave no usable answer (the caller builds in-process)."""


def read_table_file(path: str) -> dict[str, NameInfo]:
    """The table in ``path``, parsed at once; every problem a NameTableError naming the file
    (the messages of ``vmagent.dns.tablefile.read_name_table``)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise NameTableError(f"{path}: cannot read: {exc}") from None
    try:
        return parse_name_table(json.loads(text))
    except json.JSONDecodeError as exc:
        raise NameTableError(f"{path}: not valid JSON: {exc}") from None
    except NameTableError as exc:
        raise NameTableError(f"{path}: {exc}") from None


def encode_lookup(lookup: Lookup) -> bytes:
    index = lookup.names
    if not isinstance(index, NameIndex):
        raise TypeError("only a NameIndex lookup can be sent")
    head = _HEAD.pack(lookup.entries, lookup.size, len(lookup.search))
    return b"L" + head + lookup.search + index.to_bytes()


def decode_lookup(data: bytes) -> Lookup:
    """The lookup the child sent; NameTableError for its ``E`` answer; BuilderFailed else."""
    if data[:1] == b"E":
        raise NameTableError(data[1:].decode(errors="replace"))
    if data[:1] != b"L" or len(data) < 1 + _HEAD.size:
        raise BuilderFailed("no answer from the table builder")
    entries, size, search_length = _HEAD.unpack_from(data, 1)
    start = 1 + _HEAD.size
    search = data[start : start + search_length]
    try:
        index = NameIndex.from_bytes(memoryview(data)[start + search_length :])
    except ValueError as exc:
        raise BuilderFailed(f"table builder: {exc}") from None
    return Lookup(index, entries, search, size)


async def build_in_child(path: str, scope: TableScope) -> Lookup:
    """The lookup of the table file ``path`` for ``scope``, built by a child process.
    NameTableError: the table cannot be used; BuilderFailed: the child could not do it."""
    argv = [sys.executable, "-m", "vmagent.dns.tablebuild", os.path.abspath(path)]
    argv += [scope.namespace, scope.cluster_domain, *scope.search]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise BuilderFailed(f"cannot start the table builder: {exc}") from None
    try:
        out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip()[-400:]
        raise BuilderFailed(f"table builder exited with {proc.returncode}: {tail}")
    return decode_lookup(out)


async def build_nds_in_child(
    data: bytes,
    scope: TableScope,
    install: Callable[[Lookup], None],
    persist: str | None = None,
) -> None:
    """Decode, check and expand the serialized NameTable ``data`` in a child process and
    ``install`` its lookup as soon as it arrives; then, with ``persist``, wait while the child
    writes the table there as JSON (a failure is logged: the table is in use all the same).
    NameTableError: the table cannot be used (NACK it); BuilderFailed: no child did it."""
    argv = [sys.executable, "-m", "vmagent.dns.tablebuild"]
    if persist is not None:
        argv += ["--persist", os.path.abspath(persist)]
    argv += ["-", scope.namespace, scope.cluster_domain, *scope.search]
    proc = await _start(argv)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        # The child reads all of stdin before it writes anything: no pipe deadlock.
        proc.stdin.write(data)
        await proc.stdin.drain()
        proc.stdin.close()
        out = await proc.stdout.read()
        if out[:1] == b"L" or out[:1] == b"E":
            install(decode_lookup(out))  # NameTableError for "E"
        err = await proc.stderr.read()
        code = await proc.wait()
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise BuilderFailed(f"table builder: {exc}") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    tail = err.decode(errors="replace").strip()[-400:]
    if code == PERSIST_FAILED and out[:1] == b"L":
        log.warning("cannot persist the name table: %s", tail)
    elif code != 0 or out[:1] != b"L":
        raise BuilderFailed(f"table builder exited with {code}: {tail}")


async def nds_json_chunks(data: bytes, size: int = 1 << 16) -> AsyncIterator[bytes]:
    """The JSON document of the serialized NameTable ``data`` in pieces of at most ``size``
    bytes, rendered by a child process (a 100k-entry table takes ~1 s and is ~13 MB: never
    on the event loop, never whole in this process). BuilderFailed if no child can start;
    a child that fails midway ends the document early (logged)."""
    proc = await _start([sys.executable, "-m", "vmagent.dns.tablebuild", "--json"])
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
        proc.stdin.close()
        while chunk := await proc.stdout.read(size):
            yield chunk
        err = await proc.stderr.read()
        if await proc.wait() != 0:
            log.warning("table builder (--json): %s", err.decode(errors="replace")[-400:])
    except (BrokenPipeError, ConnectionResetError) as exc:
        log.warning("table builder (--json): %s", exc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _start(argv: list[str]) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise BuilderFailed(f"cannot start the table builder: {exc}") from None


def table_json(table: Mapping[str, NameInfo]) -> bytes:
    """The table's JSON document, as the agent persists it."""
    from vmagent.dns.ndstable import name_table_document

    return json.dumps(name_table_document(table), indent=1, sort_keys=True).encode() + b"\n"


def write_table_json(path: str, table: Mapping[str, NameInfo]) -> None:
    """Write the table's JSON document to ``path`` atomically (readers see the old file or the
    new one, never a part), mode 0644; OSError if it cannot."""
    data = table_json(table)
    directory = os.path.dirname(path) or "."
    # A writer killed midway (the agent stopped while a child persisted) leaves its temporary
    # file; writes are one at a time (the xDS client awaits each push's child), so any such
    # file is stale.
    for stale in glob.glob(
        os.path.join(glob.escape(directory), f".{os.path.basename(path)}.*.tmp")
    ):
        with contextlib.suppress(OSError):
            os.unlink(stale)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _read_stdin_table(checked: bool = True) -> Mapping[str, NameInfo]:
    """The NameTable on stdin; ``checked`` False: unchecked protobuf entries, for
    ``build_lookup(strict=True)`` (see :func:`vmagent.dns.ndstable.nds_entries`)."""
    from vmagent.dns.ndstable import nds_entries, parse_nds

    data = sys.stdin.buffer.read()
    return parse_nds(data) if checked else nds_entries(data)


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv == ["--json"]:
        try:
            table = _read_stdin_table()
        except NameTableError as exc:
            print(f"table builder: {exc}", file=sys.stderr)
            return 1
        sys.stdout.buffer.write(table_json(table))
        return 0
    persist = None
    if len(argv) >= 2 and argv[0] == "--persist":
        persist, argv = argv[1], argv[2:]
    if len(argv) < 3:
        print(
            "usage: python -m vmagent.dns.tablebuild [--persist PATH] FILE|- NAMESPACE DOMAIN"
            " [SEARCH...]\n       python -m vmagent.dns.tablebuild --json"
        )
        return 2
    path, namespace, domain, *search = argv
    scope = TableScope(namespace, domain, tuple(search))
    try:
        if path == "-":  # a push: decoded unchecked, checked while it is expanded
            table = _read_stdin_table(checked=False)
            lookup = build_lookup(table, scope, strict=True)
        else:
            table = read_table_file(path)
            lookup = build_lookup(table, scope)
    except NameTableError as exc:
        sys.stdout.buffer.write(b"E" + str(exc).encode())
        return 0
    sys.stdout.buffer.write(encode_lookup(lookup))
    sys.stdout.buffer.flush()
    if persist is None:
        return 0
    del lookup
    sys.stdout.close()  # the agent installs the lookup while the file is written
    os.close(1)
    try:
        write_table_json(persist, table)
    except OSError as exc:
        print(f"{persist}: {exc}", file=sys.stderr)
        return PERSIST_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
