"""Istio's protos: generated code up to date, wire numbers as Istio publishes them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vmagent._proto import ca_pb2, nds_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen-protos"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    generated = sorted(p.name for p in (tmp_path / "vmagent" / "_proto").iterdir())
    assert generated == ["ca_pb2.py", "ca_pb2.pyi", "ca_pb2_grpc.py", "nds_pb2.py", "nds_pb2.pyi"]
    for name in generated:
        fresh = (tmp_path / "vmagent" / "_proto" / name).read_text()
        assert fresh == (ROOT / "vmagent" / "_proto" / name).read_text(), (
            f"vmagent/_proto/{name} is stale: run scripts/gen-protos"
        )


def test_ca_wire_contract() -> None:
    request = ca_pb2.IstioCertificateRequest.DESCRIPTOR
    assert request.full_name == "istio.v1.auth.IstioCertificateRequest"
    numbers = {f.name: f.number for f in request.fields}
    assert numbers == {"csr": 1, "validity_duration": 3, "metadata": 4}
    assert request.fields_by_name["metadata"].message_type.full_name == "google.protobuf.Struct"
    response = ca_pb2.IstioCertificateResponse.DESCRIPTOR
    assert {f.name: f.number for f in response.fields} == {"cert_chain": 1}
    method = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].methods[0]
    assert method.full_name == "istio.v1.auth.IstioCertificateService.CreateCertificate"
    # Bytes as istiod's Go code reads them: field 1 csr, field 3 varint TTL.
    wire = ca_pb2.IstioCertificateRequest(csr="x", validity_duration=86400).SerializeToString()
    assert wire == b"\n\x01x\x18\x80\xa3\x05"


def test_nds_wire_contract() -> None:
    table = nds_pb2.NameTable.DESCRIPTOR
    assert table.full_name == "istio.networking.nds.v1.NameTable"
    info = nds_pb2.NameTable.NameInfo.DESCRIPTOR
    assert {f.name: f.number for f in info.fields} == {
        "ips": 1,
        "registry": 2,
        "shortname": 3,
        "namespace": 4,
        "alt_hosts": 5,
    }
    message = nds_pb2.NameTable()
    message.table["a.svc"].ips.append("10.0.0.1")
    assert nds_pb2.NameTable.FromString(message.SerializeToString()).table["a.svc"].ips == [
        "10.0.0.1"
    ]
