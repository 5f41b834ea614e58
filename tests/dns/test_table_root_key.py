"""A NameTable key that is the DNS root (``""`` or ``"."``) is no host: rejected like
``a..b``, naming the entry, on every path (JSON file, NDS decode, strict NDS build), and
``vmagent dns serve`` never answers ``. A`` from it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dnsfixtures import TABLE, ServerFactory, addresses, dig, dig_flags, udp, write_table

from vmagent._proto import nds_pb2
from vmagent.dns.ndstable import nds_entries, parse_nds
from vmagent.dns.table import NameTableError, TableScope, build_lookup, parse_name_table

ROOT_KEYS = ["", "."]


@pytest.mark.parametrize("key", ROOT_KEYS)
def test_root_key_is_rejected_like_an_empty_label(key: str) -> None:
    document = {"table": {key: {"ips": ["10.0.0.2"]}, "ok.example": {"ips": ["10.0.0.3"]}}}
    with pytest.raises(NameTableError, match="not a valid DNS name") as raised:
        parse_name_table(document)
    assert str(raised.value).startswith(f"{key!r}:"), raised.value  # names the entry
    with pytest.raises(NameTableError, match="not a valid DNS name"):  # the kind: same error
        parse_name_table({"table": {"a..b": {"ips": ["10.0.0.2"]}}})


@pytest.mark.parametrize("key", ROOT_KEYS)
@pytest.mark.parametrize("ips", [["10.0.0.2"], []])
def test_root_key_over_nds_is_rejected_on_both_paths(key: str, ips: list[str]) -> None:
    table = nds_pb2.NameTable()
    table.table["ok.example"].ips.append("10.0.0.3")
    table.table[key].ips.extend(ips)
    data = table.SerializeToString()
    with pytest.raises(NameTableError) as decoded:
        parse_nds(data)
    with pytest.raises(NameTableError) as strict:
        build_lookup(nds_entries(data), TableScope("ns1"), strict=True)
    assert str(decoded.value) == str(strict.value)
    assert str(decoded.value).startswith(f"{key!r}: not a valid DNS name")


def test_served_table_with_a_root_key_is_refused(serve: ServerFactory, tmp_path: Path) -> None:
    """The user-visible fault: ``dig . A`` answered ``. 30 IN A 10.0.0.2`` with AA. At start
    such a table is fatal (as any bad table); swapped in later it is refused and the
    previous table stays."""
    bad = {"table": {**TABLE["table"], ".": {"ips": ["10.0.0.2"]}}}
    first = serve.start(name_table=write_table(tmp_path / "bad.json", bad), probe=None)
    assert first.proc.wait(20) != 0
    assert "'.': not a valid DNS name" in first.output()

    path = write_table(tmp_path / "table.json", TABLE)
    srv = serve.start(name_table=path)
    write_table(path, bad)
    deadline = time.monotonic() + 10
    while "'.': not a valid" not in srv.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "'.': not a valid DNS name" in srv.output()
    assert "10.0.0.2" not in addresses(udp(srv, "."))
    assert "aa" not in dig_flags(dig(srv, ".", "A"))
    assert addresses(udp(srv, "productpage.ns1.svc.cluster.local.")) == ["9.9.9.9"]
