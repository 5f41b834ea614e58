"""A big NameTable pushed over NDS to ``vmagent run`` (issue 7 §5): checked, built and
persisted by the table builder child, answered by the DNS proxy, ACKed; a bad one NACKed with
the entry's error while the old table keeps answering; ``/status`` carries counts, not the
table, and ``/debug/ndsz`` streams the table. The xDS side is a scripted ADS upstream
(``nds_upstream.py``: devmesh cannot hold this many services quickly); devmesh is the CA."""

from __future__ import annotations

import json
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from e2e_helpers import World, dig, http_get, wait_for
from nds_upstream import ads_address

SERVICES = 20_000
LAST = SERVICES - 1
LAST_HOST = f"svc{LAST}.ns{LAST % 100}.svc.cluster.local"


def _address(version: int, i: int) -> str:
    return f"{10 + version}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


@pytest.mark.timeout(120)
def test_pushed_big_table_is_answered_acked_persisted_and_served(world: World) -> None:
    mesh = world.devmesh()
    ads = ads_address()
    script = str(Path(__file__).with_name("nds_upstream.py"))
    argv = [sys.executable, script, "--listen", ads, "--services", str(SERVICES)]
    upstream = world.procs.start("nds-upstream", argv, {"PATH": "/usr/bin:/bin"})
    wait_for(lambda: "listening" in upstream.stdout(), 30, "the NDS upstream")

    def events() -> list[str]:
        return [line.split(" ", 1)[1] for line in upstream.stdout().splitlines()]

    agent = world.agent(mesh, PROXY_CONFIG=json.dumps({"discoveryAddress": ads}))
    agent.start()
    agent.wait_ready(timeout=60)
    assert dig(agent.dns, LAST_HOST) == ("NOERROR", [_address(0, LAST)])
    wait_for(lambda: "ack v0" in events(), 10, "the ACK of v0")

    # /status: the table's counts, not the table (it was rendered whole on every call).
    code, body = http_get(agent.status_url + "/status")
    assert code == 200 and len(body) < 64_000, len(body)
    table = json.loads(body)["name_table"]
    assert table == {"entries": SERVICES, "names": 3 * SERVICES, "version": "v0"}
    # /debug/ndsz: the whole table, as the persisted file has it.
    with urllib.request.urlopen(agent.status_url + "/debug/ndsz", timeout=30) as reply:
        served = json.loads(reply.read())["table"]
    assert len(served) == SERVICES
    assert served[LAST_HOST]["ips"] == [_address(0, LAST)]
    persisted = json.loads((agent.state_dir / "nametable.json").read_text())["table"]
    assert persisted == served

    # A bad table: NACKed with the entry's error; v0 keeps answering, and is kept on disk.
    upstream.popen.send_signal(signal.SIGUSR2)
    nack = wait_for(lambda: [e for e in events() if e.startswith("nack")], 30, "the NACK")
    assert f"{LAST_HOST}: 'not-an-ip' is not an IP address" in nack[0]
    xds = agent.status()["xds"]
    assert xds["nacks"] == 1 and xds["name_table_version"] == "v0"
    assert dig(agent.dns, LAST_HOST) == ("NOERROR", [_address(0, LAST)])

    # The next good table replaces it whole.
    upstream.popen.send_signal(signal.SIGUSR1)
    wait_for(lambda: "ack v2" in events(), 30, "the ACK of v2")
    assert dig(agent.dns, LAST_HOST) == ("NOERROR", [_address(2, LAST)])
    assert dig(agent.dns, "svc0.ns0.svc.cluster.local") == ("NOERROR", [_address(2, 0)])
    persisted = json.loads((agent.state_dir / "nametable.json").read_text())["table"]
    assert persisted[LAST_HOST]["ips"] == [_address(2, LAST)]
    assert agent.status()["name_table"]["version"] == "v2"
