"""Re-onboarding a VM to another mesh (a new root-cert.pem) with the certificate directory of
the old one: ``vmagent run`` discards the stored certificate (saying why), gets a new one with
the platform credential and connects. Before, it kept presenting the old certificate and looped
on ``xds: stream ... ended (TimeoutError: )``."""

from __future__ import annotations

import re

import pytest
from e2e_helpers import Devmesh, World, wait_for

C_CORE_LINE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


@pytest.mark.timeout(90)
def test_reonboarded_to_another_mesh_discards_the_old_certificate(world: World) -> None:
    mesh_a = world.devmesh()
    agent = world.agent(mesh_a)
    agent.start()
    agent.wait_ready()
    wait_for(lambda: agent.status()["identity"]["serial"], 10, "a certificate from mesh A")
    old_serial = agent.status()["identity"]["serial"]
    assert agent.proc is not None
    agent.proc.terminate()
    mesh_a.stop()

    mesh_b = Devmesh(world.procs, world.config_dir, world.tmp / "devmesh-keys-b")
    mesh_b.start()
    assert mesh_b.root_cert.read_bytes() != mesh_a.root_cert.read_bytes()
    agent.mesh = mesh_b
    agent.prepare()  # mesh B's root-cert.pem and token; the state directory stays
    proc = agent.start()
    agent.wait_ready(30)

    def reissued() -> bool:
        status = agent.status()
        return bool(status["xds"]["connected"]) and status["identity"]["serial"] not in (
            None,
            old_serial,
        )

    try:
        wait_for(reissued, 30, "a new certificate and xDS to mesh B")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{proc.describe()}") from None
    log = proc.stderr() + proc.stdout()
    assert "discarding stored certificate" in log and "root-cert.pem" in log
    assert "TimeoutError: )" not in log
    assert not C_CORE_LINE.search(proc.stderr()), proc.stderr()
    (connection,) = mesh_b.get("/debug/connections")["connections"]
    assert connection["identity"] in (None, "spiffe://cluster.local/ns/vm/sa/vm-web")
