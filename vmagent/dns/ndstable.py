"""Istio's NameTable as protobuf bytes (``istio.networking.nds.v1.NameTable``, what NDS pushes)
to the table (:class:`~vmagent.dns.table.NameInfo` per host) and to its JSON document.

Used by the table builder child (:mod:`vmagent.dns.tablebuild`), which decodes a pushed table
off the agent's process (issue 7 §5), and by the xDS session's in-process fallback. Imports
only protobuf and the generated message: the child starts in ~0.1 s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from google.protobuf import message

from vmagent._proto import nds_pb2
from vmagent.dns.table import NameInfo, NameTableError, check_host, check_ips


def parse_nds(data: bytes) -> dict[str, NameInfo]:
    """The table in the serialized NameTable ``data``; NameTableError when it does not decode
    or an entry is invalid (the messages of :func:`~vmagent.dns.table.parse_name_table`)."""
    return table_from_proto(_parse(data))


def nds_entries(data: bytes) -> Mapping[str, NameInfo]:
    """The entries of the serialized NameTable ``data`` as they decode: protobuf NameInfo
    messages, which have :class:`NameInfo`'s fields, *unchecked*: for
    ``build_lookup(..., strict=True)``, which checks them on the way (the table builder's
    quick path); NameTableError when ``data`` does not decode."""
    # Duck-typed: the messages have NameInfo's fields; the map keeps its message alive.
    return cast("Mapping[str, NameInfo]", _parse(data).table)


def _parse(data: bytes) -> nds_pb2.NameTable:
    table = nds_pb2.NameTable()
    try:
        table.ParseFromString(data)
    except message.DecodeError as exc:  # corrupt bytes: NACK, do not end the stream
        raise NameTableError(f"resource does not decode as a NameTable: {exc}") from None
    return table


def table_from_proto(table: nds_pb2.NameTable) -> dict[str, NameInfo]:
    """``parse_name_table(MessageToDict(table))``: the same table and the same errors (checked
    by the tests), without intermediate dicts: protobuf already guarantees the fields' types,
    so only the values are checked here."""
    result: dict[str, NameInfo] = {}
    shared: dict[str, str] = {}  # one str per distinct registry/namespace, as parse_name_table
    share = shared.setdefault
    for host, info in table.table.items():
        ips = tuple(info.ips)
        check_ips(host, ips)
        check_host(host)
        registry, namespace = info.registry, info.namespace
        result[host] = NameInfo(
            ips, share(registry, registry), info.shortname, share(namespace, namespace),
            tuple(info.alt_hosts),
        )  # fmt: skip
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
