"""Istio's NameTable as protobuf bytes (``istio.networking.nds.v1.NameTable``, what NDS pushes)
to the table (:class:`~vmagent.dns.table.NameInfo` per host) and to its JSON document.

Used by the table builder child (:mod:`vmagent.dns.tablebuild`), which decodes a pushed table
off the agent's process (issue 7 §5), and by the xDS session's in-process fallback. Imports
only protobuf and the generated message: the child starts in ~0.1 s."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import message

from vmagent._proto import nds_pb2
from vmagent.dns.table import NameInfo, NameTableError, parse_name_table

CHUNK_ENTRIES = 1000  # entries turned into dicts and checked at a time (bounded garbage)


def parse_nds(data: bytes) -> dict[str, NameInfo]:
    """The table in the serialized NameTable ``data``; NameTableError when it does not decode
    or an entry is invalid (the messages of :func:`~vmagent.dns.table.parse_name_table`)."""
    table = nds_pb2.NameTable()
    try:
        table.ParseFromString(data)
    except message.DecodeError as exc:  # corrupt bytes: NACK, do not end the stream
        raise NameTableError(f"resource does not decode as a NameTable: {exc}") from None
    return table_from_proto(table)


def table_from_proto(table: nds_pb2.NameTable) -> dict[str, NameInfo]:
    """``parse_name_table(MessageToDict(table))``, ``CHUNK_ENTRIES`` entries at a time: the
    whole table as dicts (~9 MB at 10k entries) never exists at once."""
    result: dict[str, NameInfo] = {}
    chunk: dict[str, dict[str, object]] = {}
    for host, info in table.table.items():
        entry: dict[str, object] = {}
        if info.ips:
            entry["ips"] = list(info.ips)
        for key in ("registry", "shortname", "namespace"):
            if getattr(info, key):
                entry[key] = getattr(info, key)
        if info.alt_hosts:
            entry["alt_hosts"] = list(info.alt_hosts)
        chunk[host] = entry
        if len(chunk) >= CHUNK_ENTRIES:
            result.update(parse_name_table({"table": chunk}))
            chunk = {}
    result.update(parse_name_table({"table": chunk}))
    return result


def name_table_document(table: Mapping[str, NameInfo]) -> dict[str, object]:
    """The protobuf JSON mapping of a table (what ``--name-table`` files and the persisted
    table hold, and ``/debug/ndsz`` serves)."""
    entries: dict[str, object] = {}
    for host, info in table.items():
        entry: dict[str, object] = {"ips": list(info.ips)}
        for key, value in (
            ("registry", info.registry),
            ("shortname", info.shortname),
            ("namespace", info.namespace),
        ):
            if value:
                entry[key] = value
        if info.alt_hosts:
            entry["alt_hosts"] = list(info.alt_hosts)
        entries[host] = entry
    return {"table": entries}
