"""The .deb installed into a fresh Debian 12 root and booted with real systemd (PID 1).

Each test: a root unpacked from the session's mmdebstrap tarball, the package installed with
``apt-get``, the onboarding files for devmesh's example group in /etc/vmagent, a devmesh from
this checkout in the network namespace the booted root lives in (bootroot.py). Checked as an
operator would: ``systemctl``, ``vmagent status``, ``journalctl``, ``iptables-save``, ``apt-get``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from bootroot import (
    CLOUD_IP,
    HOST_NAME,
    HOST_NAME_IP,
    VM_IP,
    Machine,
    NetNS,
    Root,
    booted,
    onboarding_files,
)
from pkgtools import Built, run

pytestmark = [pytest.mark.boot, pytest.mark.timeout(900)]


def onboard(root: Root, keys: Path, **cluster_env: str) -> None:
    """The onboarding files in /etc/vmagent, root:vmagent 0640 (as `vmagent onboard` does)."""
    for name, text in onboarding_files(keys, **cluster_env).items():
        if name == "hosts":
            with root.file("/etc/hosts").open("a") as hosts:
                hosts.write(text)
        else:
            root.write(f"/etc/vmagent/{name}", text, 0o640)
            os.chown(root.file(f"/etc/vmagent/{name}"), 0, root.gid("vmagent"))


def installed_root(tmp_path: Path, tarball: Path, built: Built, keys: Path, **env: str) -> Root:
    root = Root(tmp_path / "root", tarball)
    output = root.install_offline(built.deb).stdout
    # No systemd running at install time: enabled, not started.
    assert "Created symlink /etc/systemd/system/multi-user.target.wants/vmagent.service" in output
    onboard(root, keys, **env)
    return root


def wait_ready(machine: Machine, seconds: float = 60) -> None:
    """Type=notify: `active` only once the agent sent READY=1."""
    machine.wait_for(
        lambda: machine.sh("systemctl is-active vmagent").stdout.strip() == "active",
        seconds,
        "vmagent.service to be active (READY=1)",
    )


def status_json(machine: Machine) -> dict[str, object]:
    result = machine.sh("vmagent status --json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_boot_reaches_ready_and_status_reports_healthy(
    tmp_path: Path, tarball: Path, built: Built, keys: Path, netns: NetNS
) -> None:
    root = installed_root(tmp_path, tarball, built, keys)
    with booted(root, netns, tmp_path / "boot.log") as machine:
        wait_ready(machine)
        show = {
            key: machine.sh(f"systemctl show -P {key} vmagent").stdout.strip()
            for key in ("User", "Type", "StatusText")
        }
        assert show["User"] == "vmagent" and show["Type"] == "notify", show
        assert show["StatusText"] == "ready", show
        text = machine.sh("vmagent status")
        assert text.returncode == 0, text.stdout + text.stderr
        assert text.stdout.startswith("vmagent ") and "HEALTHY" in text.stdout.splitlines()[0]
        view = status_json(machine)
        assert view["schema_version"] == 1 and view["state"] == "healthy", view
        identity, plane, envoy = view["identity"], view["control_plane"], view["envoy"]
        assert identity["spiffe_id"] == "spiffe://cluster.local/ns/vm/sa/vm-web"  # type: ignore[index]
        assert plane["connected"] is True  # type: ignore[index]
        assert plane["workload_entry"] == f"vm-web-{VM_IP}"  # type: ignore[index]
        assert envoy["live"] is True and envoy["pid"], envoy  # type: ignore[index]
        # The control plane's side: the WorkloadEntry is registered.
        registry = netns.cloud_run("curl", "-sf", f"http://{CLOUD_IP}:15014/debug/registry")
        assert f"vm-web-{VM_IP}" in registry.stdout, registry
        # Envoy is the agent's child, under the agent's user.
        agent, envoy_pid = machine.main_pid(), envoy["pid"]  # type: ignore[index]
        proc = machine.sh(f"stat -c %U /proc/{envoy_pid}; cut -d' ' -f4 /proc/{envoy_pid}/stat")
        assert proc.stdout.split() == ["vmagent", str(agent)], proc
        assert "envoy" in machine.sh(f"cat /proc/{envoy_pid}/comm").stdout
        # The status socket: root and the vmagent group, nobody else (exit 4, says what to do).
        other = machine.sh("setpriv --reuid=65534 --regid=65534 --clear-groups vmagent status")
        assert other.returncode == 4 and "permission denied" in other.stderr, other
        member = machine.sh(
            "setpriv --reuid=65534 --regid=65534 --groups=$(getent group vmagent | cut -d: -f3)"
            " vmagent status --json"
        )
        assert member.returncode == 0, member.stderr
        # journald: priorities from the <N> prefixes, no timestamps of the agent's own.
        entries = [
            json.loads(line)
            for line in machine.sh("journalctl -u vmagent -o json --no-pager").stdout.splitlines()
        ]
        agent_lines = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "vmagent"]
        assert agent_lines and all(e["PRIORITY"] in "34567" for e in agent_lines)
        assert any(e["PRIORITY"] == "6" for e in agent_lines)
        assert not any(str(e["MESSAGE"]).startswith(("<", "20")) for e in agent_lines)


def test_watchdog_restarts_an_agent_whose_event_loop_stops(
    tmp_path: Path, tarball: Path, built: Built, keys: Path, netns: NetNS
) -> None:
    root = installed_root(tmp_path, tarball, built, keys)
    # The shipped 30 s / 10 s (checked in test_packaging_build) shortened so the test is quick.
    root.write(
        "/etc/systemd/system/vmagent.service.d/test.conf",
        "[Service]\nWatchdogSec=4s\nRestartSec=1s\n",
    )
    with booted(root, netns, tmp_path / "boot.log") as machine:
        wait_ready(machine)
        first = machine.main_pid()
        assert machine.sh(f"kill -STOP {first}").returncode == 0
        machine.wait_for(
            lambda: (
                machine.main_pid() not in (0, first)
                and machine.sh("systemctl is-active vmagent").stdout.strip() == "active"
            ),
            60,
            "a new agent after the watchdog timeout",
        )
        journal = machine.sh("journalctl -u vmagent --no-pager").stdout
        assert "Watchdog timeout" in journal, journal[-3000:]
        assert status_json(machine)["state"] == "healthy"


def lookup(machine: Machine, name: str) -> list[str]:
    """``name`` looked up the ordinary way (resolv.conf's server, port 53): [address, name]."""
    return machine.sh(f"getent hosts {name}").stdout.split()


def test_stop_and_crash_remove_the_capture_rules(
    tmp_path: Path, tarball: Path, built: Built, keys: Path, netns: NetNS
) -> None:
    root = installed_root(tmp_path, tarball, built, keys, ISTIO_META_DNS_CAPTURE="true")
    root.write("/etc/systemd/system/vmagent.service.d/test.conf", "[Service]\nRestartSec=1h\n")
    mesh_name = "productpage.bookinfo.svc.cluster.local"
    with booted(root, netns, tmp_path / "boot.log") as machine:
        wait_ready(machine)
        assert "VMAGENT_OUTPUT" in machine.sh("iptables-save -t nat").stdout
        assert status_json(machine)["capture"]["applied"] is True  # type: ignore[index]
        # The resolver's address is captured: mesh names answer from the NameTable, the rest
        # is forwarded to the resolver.
        assert lookup(machine, mesh_name)[1:] == [mesh_name]
        assert lookup(machine, HOST_NAME) == [HOST_NAME_IP, HOST_NAME]
        assert machine.sh("systemctl stop vmagent").returncode == 0
        # A clean stop: drained and exited within TimeoutStopSec, no SIGKILL, no failure.
        assert machine.sh("systemctl show -P Result vmagent").stdout.strip() == "success"
        assert "timed out" not in machine.sh("journalctl -u vmagent --no-pager").stdout
        assert "VMAGENT" not in machine.sh("iptables-save").stdout
        # Host DNS as before: the resolver answers, it knows no mesh name.
        assert lookup(machine, HOST_NAME) == [HOST_NAME_IP, HOST_NAME]
        assert lookup(machine, mesh_name) == []

        # A crash (SIGKILL: no clean-up by the agent): ExecStopPost still removes them.
        assert machine.sh("systemctl start vmagent").returncode == 0
        assert "VMAGENT_OUTPUT" in machine.sh("iptables-save -t nat").stdout
        machine.sh("systemctl kill -s KILL --kill-whom=main vmagent")
        machine.wait_for(
            lambda: "VMAGENT" not in machine.sh("iptables-save").stdout,
            20,
            "ExecStopPost to remove the rules after SIGKILL",
        )
        assert lookup(machine, HOST_NAME) == [HOST_NAME_IP, HOST_NAME]


def test_remove_keeps_config_and_purge_removes_everything(
    tmp_path: Path, tarball: Path, built: Built, keys: Path, netns: NetNS
) -> None:
    root = installed_root(tmp_path, tarball, built, keys)
    with booted(root, netns, tmp_path / "boot.log") as machine:
        wait_ready(machine)
        assert machine.sh("ls /var/lib/vmagent/certs").stdout.split()
        removed = machine.sh("apt-get remove -y -q vmagent")
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert machine.sh("systemctl is-active vmagent").stdout.strip() != "active"
        assert machine.sh("pgrep -u vmagent").stdout == ""  # nothing left running
        assert not root.file("/opt/vmagent").exists()
        assert not root.file("/usr/bin/vmagent").exists()
        for kept in ("/etc/vmagent/cluster.env", "/etc/vmagent/istio-token", "/var/lib/vmagent"):
            assert root.file(kept).exists(), kept
        # Installed again with its configuration still there: started, as a fresh install
        # (dpkg passes the old version, as for an upgrade of a stopped agent).
        again = machine.sh(f"apt-get install -y -q /var/tmp/pkgs/{built.deb.name}")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "vmagent status --wait 300" in again.stdout
        assert machine.sh("vmagent status --wait 60").returncode == 0
        purged = machine.sh("apt-get purge -y -q vmagent")
        assert purged.returncode == 0, purged.stdout + purged.stderr
        for gone in ("/etc/vmagent", "/var/lib/vmagent", "/lib/systemd/system/vmagent.service"):
            assert not root.file(gone).exists(), gone
        enabled = machine.sh("systemctl is-enabled vmagent")
        assert enabled.returncode != 0, enabled.stdout
        assert "vmagent" not in machine.sh("dpkg-query -W -f '${Status}' vmagent").stdout


@pytest.fixture(scope="session")
def rebuilt(rebuilt_packages: tuple[Path, Path]) -> Path:
    """The same tree built again as release N+1 (a higher version): its .deb (conftest.py)."""
    return rebuilt_packages[0]


def digest(root: Root, directory: str) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.file(directory).iterdir())
        if p.is_file() and p.suffix == ".pem"
    }


def test_upgrade_keeps_config_and_certs_and_restarts_the_agent(
    tmp_path: Path, tarball: Path, built: Built, rebuilt: Path, keys: Path, netns: NetNS
) -> None:
    root = installed_root(tmp_path, tarball, built, keys)
    with booted(root, netns, tmp_path / "boot.log") as machine:
        wait_ready(machine)
        root.write("/etc/vmagent/cluster.env.example", "# the admin's own notes\n")
        config, certs = digest(root, "/etc/vmagent"), digest(root, "/var/lib/vmagent/certs")
        assert certs, "no certificates stored before the upgrade"
        before = machine.main_pid()
        inside = root.copy_in(rebuilt)
        upgraded = machine.sh(f"apt-get install -y -q -o Dpkg::Options::=--force-confold {inside}")
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
        version = machine.sh("dpkg-query -W -f '${Version}' vmagent").stdout
        assert version == run("dpkg-deb", "-f", rebuilt, "Version").stdout.strip()
        # --no-block: the restart is queued, the upgrade does not wait for READY=1.
        machine.wait_for(
            lambda: (
                machine.main_pid() not in (0, before)
                and machine.sh("systemctl is-active vmagent").stdout.strip() == "active"
            ),
            60,
            "the running agent restarted into the new version",
        )
        assert digest(root, "/etc/vmagent") == config
        assert digest(root, "/var/lib/vmagent/certs") == certs
        assert status_json(machine)["state"] == "healthy"


def test_install_on_a_running_system_starts_only_when_configured(
    tmp_path: Path, tarball: Path, built: Built, keys: Path, netns: NetNS
) -> None:
    root = Root(tmp_path / "root", tarball)
    inside = root.copy_in(built.deb)
    with booted(root, netns, tmp_path / "boot.log") as machine:
        fresh = machine.sh(f"apt-get install -y -q {inside}")
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr
        assert "installed and enabled, not started" in fresh.stdout
        assert "vmagent onboard --from DIR" in fresh.stdout
        assert machine.sh("systemctl is-enabled vmagent").stdout.strip() == "enabled"
        assert machine.sh("systemctl is-active vmagent").stdout.strip() == "inactive"
        not_running = machine.sh("vmagent status")
        assert not_running.returncode == 3 and "systemctl start vmagent" in not_running.stderr
        onboard(root, keys)
        assert machine.sh("systemctl start vmagent").returncode == 0  # returns after READY=1
        assert machine.sh("vmagent status").returncode == 0


def test_install_does_not_wait_for_an_unreachable_istiod(
    tmp_path: Path, tarball: Path, built: Built, keys: Path, netns: NetNS
) -> None:
    """Onboarding files first (as cloud-init writes them), istiod not reachable: apt-get
    returns with the agent starting, it does not hang until TimeoutStartSec (5 min)."""
    root = Root(tmp_path / "root", tarball)
    # A short start timeout: the agent's EXTEND_TIMEOUT_USEC keeps it from being killed.
    root.write("/etc/systemd/system/vmagent.service.d/test.conf", "[Service]\nTimeoutStartSec=3s\n")
    onboard_before_install = onboarding_files(keys)
    root.write("/etc/vmagent/mesh.yaml", f"defaultConfig:\n  discoveryAddress: {CLOUD_IP}:1\n")
    for name in ("cluster.env", "root-cert.pem", "istio-token"):
        # Readable by the agent's user, which does not exist yet (no vmagent group).
        root.write(f"/etc/vmagent/{name}", onboard_before_install[name], 0o644)
    inside = root.copy_in(built.deb)
    with booted(root, netns, tmp_path / "boot.log") as machine:
        fresh = machine.sh(f"apt-get install -y -q {inside}", timeout=120)
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr
        assert "vmagent status --wait 300" in fresh.stdout
        machine.wait_for(
            lambda: machine.sh("systemctl is-active vmagent").stdout.strip() == "activating",
            30,
            "the agent to be starting (waiting for istiod)",
        )
        first = machine.main_pid()
        waiting = machine.sh("vmagent status --wait 8")
        assert waiting.returncode == 1, waiting  # running, not healthy: says why
        assert f"{CLOUD_IP}:1" in waiting.stdout + waiting.stderr
        # Well past TimeoutStartSec=3s: still the same agent, still starting, not killed.
        assert machine.main_pid() == first
        assert machine.sh("systemctl is-active vmagent").stdout.strip() == "activating"
        assert "timed out" not in machine.sh("journalctl -u vmagent --no-pager").stdout
        # istiod reachable again (the address fixed): ready without a restart of the unit.
        root.write("/etc/vmagent/mesh.yaml", onboard_before_install["mesh.yaml"])
        with root.file("/etc/hosts").open("a") as hosts:
            hosts.write(onboard_before_install["hosts"])
        machine.sh(f"kill -HUP {first}")
        assert machine.sh("vmagent status --wait 60").returncode == 0
        assert machine.sh("systemctl is-active vmagent").stdout.strip() == "active"


def test_boot_completes_while_istiod_is_unreachable(
    tmp_path: Path, tarball: Path, built: Built, keys: Path, netns: NetNS
) -> None:
    """A configured VM rebooting while istiod is away: the boot reaches multi-user.target
    (and cloud-final, and whatever follows it) while the agent waits for READY=1 and keeps
    retrying; only units ordered After=vmagent wait for the mesh."""
    root = installed_root(tmp_path, tarball, built, keys)
    unreachable = f"defaultConfig:\n  discoveryAddress: {CLOUD_IP}:1\n"
    mesh = root.write("/etc/vmagent/mesh.yaml", unreachable)
    os.chown(mesh, 0, root.gid("vmagent"))
    with booted(root, netns, tmp_path / "boot.log", until_booted=False) as machine:
        machine.wait_for(
            lambda: machine.sh("systemctl is-active multi-user.target").stdout.strip() == "active",
            60,
            "multi-user.target while the agent waits for istiod",
        )
        # Starting (not failed and restarting), saying what it waits for.
        machine.wait_for(
            lambda: (
                machine.sh("systemctl show -P SubState vmagent").stdout.strip() == "start"
                and "waiting for" in machine.sh("systemctl show -P StatusText vmagent").stdout
            ),
            30,
            "vmagent starting and saying what it waits for",
        )
        assert machine.sh("systemctl show -P NRestarts vmagent").stdout.strip() == "0"
