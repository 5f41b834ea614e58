"""The .rpm installed with ``rpm --root`` into a Debian 12 root: files, owners, scriptlets.

rpm runs the scriptlets chrooted into the root with /bin/sh, so the root needs a userland: the
boot tests' Debian root (bootroot.Root, from the session's mmdebstrap tarball) has sh, getent,
groupadd/useradd (passwd) and systemctl. No systemd runs in it: %post's ``systemctl enable``
works offline in a chroot (it only makes the symlink), and nothing is started.

Every install uses ``--nodeps``: the .rpm requires EL9 names (python3.11, glibc, iptables-nft,
iproute, shadow-utils, systemd) that an empty rpm database in a Debian root cannot satisfy
offline. What they stand for is there (/usr/bin/python3.11, iptables, iproute2, passwd,
systemd), and the agent is run from the root to show it. The database is at EL's /var/lib/rpm
in the root (Debian's rpm would use ~/.rpmdb); Debian's rpm also wants ``--force-debian`` to
not warn that it is not dpkg. Scriptlet semantics ($1 counts, .rpmnew/.rpmsave): rpm's
"Packaging Guidelines: Scriptlets" (Fedora) and rpm's own docs (spec.md, "Config files").
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from bootroot import (
    Machine,
    NetNS,
    Root,
    booted,
    onboarding_files,
)
from pkgtools import Built, run

pytestmark = [pytest.mark.boot, pytest.mark.timeout(900)]

DBPATH = "/var/lib/rpm"
UNIT = "/usr/lib/systemd/system/vmagent.service"
WANTS = "/etc/systemd/system/multi-user.target.wants/vmagent.service"
EXAMPLE = "/etc/vmagent/cluster.env.example"
CERT = "/var/lib/vmagent/certs/cert-chain.pem"


# rpm against a booted root, run by the host's python3-rpm (rpmlint's dependency): loaded here,
# then chrooted into /proc/LEADER/root (the root as the container sees it: its /run, where
# systemd runs) and in the container's PID namespace (systemd's private bus refuses calls from
# a peer it cannot see). Not the rpm command with --root /proc/LEADER/root: SQLite resolves
# that magic link to "/" and would open the host's own /var/lib/rpm.
LIVE_RPM = """
import os, sys, rpm
leader, dbpath, op, *args = sys.argv[1:]
fds = {a: os.open(a, os.O_RDONLY) for a in args if a.endswith(".rpm")}
os.chroot(f"/proc/{leader}/root")
os.chdir("/")
rpm.addMacro("_dbpath", dbpath)
ts = rpm.TransactionSet("/")
ts.setVSFlags(rpm._RPMVSF_NOSIGNATURES)
ts.setFlags(rpm.RPMTRANS_FLAG_NOPLUGINS)
for arg in args:
    if op == "-e":
        ts.addErase(arg)
    else:
        ts.addInstall(ts.hdrFromFdno(fds[arg]), arg, "u" if op == "-U" else "i")
def callback(what, amount, total, key, data):
    if what == rpm.RPMCALLBACK_INST_OPEN_FILE:
        os.lseek(fds[key], 0, os.SEEK_SET)
        return fds[key]
ts.order()
problems = ts.run(callback, "")
sys.exit(f"rpm {op}: {problems}" if problems else 0)
"""


class RpmRoot:
    """A Debian root with its own rpm database (EL's path in it); ``rpm(...)`` runs the host's
    rpm on it, ``live(...)`` runs a transaction against it booted (``leader``: the pid of its
    systemd on this host), with no dependency checks there either."""

    def __init__(self, root: Root, options: tuple[str, ...]) -> None:
        self.root = root
        self.options = options
        self.leader = 0
        # rpm --initdb hands over to rpmdb, which has no --force-debian.
        initdb = run("rpm", "--root", root.path, "--dbpath", DBPATH, "--initdb", check=False)
        assert initdb.returncode == 0, initdb.stderr

    def rpm(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return run(
            "rpm", "--root", self.root.path, "--dbpath", DBPATH, *self.options, *args,
            check=False, timeout=300,
        )  # fmt: skip

    def live(self, op: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """``op`` (-i, -U, -e) with ``args`` (package files or names) on the booted root."""
        assert self.leader, "not booted"
        leader = str(self.leader)
        return run(
            "nsenter", "-t", leader, "-p", "--", "/usr/bin/python3", "-c", LIVE_RPM, leader,
            DBPATH, op, *args, check=False, timeout=300,
        )  # fmt: skip

    def install(self, *args: str | Path) -> None:
        """``rpm -i --nodeps args``: exit 0 and silent (no scriptlet said anything)."""
        result = self.rpm("-i", "--nodeps", *args)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result

    def chroot(self, *command: str) -> subprocess.CompletedProcess[str]:
        return run("chroot", self.root.path, *command, check=False, timeout=120)

    def verify(self) -> dict[str, str]:
        """``rpm -V --nodeps vmagent`` as {path: flags}; {} when everything matches."""
        result = self.rpm("-V", "--nodeps", "vmagent")
        lines = result.stdout.splitlines()
        assert result.returncode == (1 if lines else 0), result
        return {line.split()[-1]: line.rsplit(None, 1)[0] for line in lines}

    def enabled(self) -> bool:
        """The unit is enabled as systemctl in the root reports it (and the wants link)."""
        state = self.chroot("systemctl", "is-enabled", "vmagent.service").stdout.strip()
        assert (state == "enabled") == os.path.lexists(self.root.file(WANTS)), state
        return state == "enabled"


@pytest.fixture(scope="session")
def rpm_options() -> tuple[str, ...]:
    if os.geteuid() != 0:
        pytest.skip("rpm --root into a Debian root needs root (chroot, file owners)")
    if shutil.which("rpm") is None:
        pytest.skip("rpm missing (apt-get install rpm); run scripts/setup --test")
    # Host plugins (syslog, systemd_inhibit, dbus_announce) would act on this machine.
    debian = "--force-debian" in run("rpm", "--help").stdout
    return ("--noplugins", "--force-debian") if debian else ("--noplugins",)


@pytest.fixture
def rpm_root(tmp_path: Path, debian_tarball: Path, rpm_options: tuple[str, ...]) -> RpmRoot:
    return RpmRoot(Root(tmp_path / "root", debian_tarball), rpm_options)


def passwd(root: Root) -> dict[str, list[str]]:
    """The root's /etc/passwd: {name: [x, uid, gid, gecos, home, shell]}."""
    lines = root.file("/etc/passwd").read_text().splitlines()
    return {fields[0]: fields[1:] for fields in (line.split(":") for line in lines)}


def processes_in(root: Root) -> list[str]:
    """Processes whose root directory is ``root`` (what a chrooted scriptlet would start)."""
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if os.path.realpath(f"/proc/{process.pid}/root") == str(root.path.resolve()):
                found.append(f"{process.pid} {process.info['name']}")
        except (OSError, psutil.Error):
            continue
    return found


def digests(root: Root, *directories: str) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for directory in directories
        for p in sorted(root.file(directory).iterdir())
        if p.is_file()
    }


def configure(root: Root) -> None:
    """What an admin leaves on the VM: an edited example, onboarding files, a stored cert."""
    gid = root.gid("vmagent")
    with root.file(EXAMPLE).open("a") as example:
        example.write("# the admin's own notes\n")
    for name, text in (("cluster.env", "POD_NAMESPACE=vm\n"), ("istio-token", "token\n")):
        root.write(f"/etc/vmagent/{name}", text, 0o640)
        os.chown(root.file(f"/etc/vmagent/{name}"), 0, gid)
    root.write(CERT, "-----BEGIN CERTIFICATE-----\n", 0o600)
    uid = int(passwd(root)["vmagent"][1])
    for path in (CERT, "/var/lib/vmagent/certs", "/var/lib/vmagent"):
        os.chown(root.file(path), uid, gid)


def test_install_creates_users_files_and_enables_the_unit(rpm_root: RpmRoot, built: Built) -> None:
    root = rpm_root.root
    rpm_root.install(built.rpm)
    query = rpm_root.rpm("-qi", "vmagent")
    assert query.returncode == 0, query.stderr
    assert "Name        : vmagent" in query.stdout
    nevra = rpm_root.rpm("-q", "--qf", "%{VERSION}-%{RELEASE}.%{ARCH}", "vmagent").stdout
    assert nevra == f"{built.version}.x86_64"
    # Every file as the header says: contents, modes, owners (/etc/vmagent's group too).
    assert rpm_root.verify() == {}

    # %pre: system users (uid < 1000) that cannot log in, each in its own group.
    users = passwd(root)
    for name in ("vmagent", "vmagent-envoy"):
        _, uid, gid, _, _, shell = users[name]
        assert int(uid) < 1000 and int(gid) == root.gid(name), users[name]
        assert shell.endswith("/nologin") and root.file(shell).exists(), users[name]
    assert users["vmagent"][4] == "/var/lib/vmagent"

    # /etc/vmagent holds the token: root writes, the agent's group reads, others nothing.
    etc = root.file("/etc/vmagent").stat()
    assert (etc.st_uid, etc.st_gid, etc.st_mode & 0o7777) == (0, root.gid("vmagent"), 0o750)
    # An --restore (an admin repairing permissions) keeps the agent able to read it.
    assert rpm_root.rpm("--restore", "vmagent").returncode == 0
    assert root.file("/etc/vmagent").stat().st_gid == root.gid("vmagent")
    flags = rpm_root.rpm("-q", "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]", "vmagent")
    assert f"cn {EXAMPLE}" in flags.stdout.splitlines()  # %config(noreplace)

    # The runtime runs from the root with the root's /usr/bin/python3.11.
    version = run(sys.executable, "-m", "vmagent", "--version").stdout.strip()
    ran = rpm_root.chroot("/usr/bin/vmagent", "--version")
    assert (ran.returncode, ran.stdout.strip()) == (0, version), ran.stderr
    assert os.readlink(root.file("/opt/vmagent/bin/python3.11")) == "/usr/bin/python3.11"
    unit = root.file(UNIT)
    deb_unit = built.root / "lib/systemd/system/vmagent.service"  # the same build's .deb
    assert unit.read_bytes() == deb_unit.read_bytes()

    # %post: enabled (the wants link leads to the packaged unit), not started.
    assert rpm_root.enabled()
    # The link is absolute inside the root (/lib/... on Debian's merged /usr).
    assert root.file(os.readlink(root.file(WANTS))).resolve() == unit.resolve()
    assert processes_in(root) == []
    assert not root.file("/run/vmagent").exists()


def test_install_over_config_written_first_fixes_the_directory(
    rpm_root: RpmRoot, built: Built
) -> None:
    """cloud-init's write_files runs before its packages module: /etc/vmagent may exist
    (root:root 0755, with the onboarding files) before the package comes."""
    root = rpm_root.root
    root.write("/etc/vmagent/cluster.env", "POD_NAMESPACE=vm\n", 0o640)
    root.file("/etc/vmagent").chmod(0o755)
    rpm_root.install(built.rpm)
    etc = root.file("/etc/vmagent").stat()
    assert (etc.st_uid, etc.st_gid, etc.st_mode & 0o7777) == (0, root.gid("vmagent"), 0o750)
    assert root.file("/etc/vmagent/cluster.env").read_text() == "POD_NAMESPACE=vm\n"
    assert rpm_root.verify() == {}
    # No systemd running: enabled, not started even though configured.
    assert rpm_root.enabled() and processes_in(root) == []


def test_upgrade_keeps_config_and_certs_and_the_admins_enable_choice(
    rpm_root: RpmRoot, built: Built, rebuilt_packages: tuple[Path, Path]
) -> None:
    root = rpm_root.root
    next_rpm = rebuilt_packages[1]
    rpm_root.install(built.rpm)
    configure(root)
    kept = digests(root, "/etc/vmagent", "/var/lib/vmagent/certs")
    owners = {p: (s.st_uid, s.st_gid, s.st_mode) for p in kept for s in [os.stat(p)]}

    upgraded = rpm_root.rpm("-U", "--nodeps", next_rpm)
    assert (upgraded.returncode, upgraded.stdout, upgraded.stderr) == (0, "", ""), upgraded
    versions = rpm_root.rpm("-q", "--qf", "%{VERSION}-%{RELEASE}\n", "vmagent").stdout
    expected = run("rpm", "-qp", "--qf", "%{VERSION}-%{RELEASE}\n", next_rpm).stdout
    assert versions == expected and versions != f"{built.version}\n"  # one, the new one
    # noreplace: the edited example stays. The new package's example is the same file as the
    # old one's, so rpm writes no .rpmnew (it would if the shipped example had changed).
    assert digests(root, "/etc/vmagent", "/var/lib/vmagent/certs") == kept
    assert {p: (s.st_uid, s.st_gid, s.st_mode) for p in kept for s in [os.stat(p)]} == owners
    assert not root.file(f"{EXAMPLE}.rpmnew").exists()
    changed = rpm_root.verify()
    assert list(changed) == [EXAMPLE] and changed[EXAMPLE].endswith(" c"), changed
    # %preun/%postun of the old package ran with $1 = 1: the unit stays enabled.
    assert rpm_root.enabled()
    assert processes_in(root) == []

    # A unit the admin disabled stays disabled across a package change (here a downgrade).
    assert rpm_root.chroot("systemctl", "disable", "vmagent.service").returncode == 0
    downgraded = rpm_root.rpm("-U", "--nodeps", "--oldpackage", built.rpm)
    assert downgraded.returncode == 0 and downgraded.stderr == "", downgraded
    assert not rpm_root.enabled()
    assert digests(root, "/etc/vmagent", "/var/lib/vmagent/certs") == kept


def test_erase_disables_and_keeps_config_then_reinstall_is_clean(
    rpm_root: RpmRoot, built: Built
) -> None:
    root = rpm_root.root
    rpm_root.install(built.rpm)
    configure(root)
    edited = root.file(EXAMPLE).read_text()
    users = root.file("/etc/passwd").read_text()

    erased = rpm_root.rpm("-e", "vmagent")
    assert erased.returncode == 0, erased
    # rpm's own words for the edited config file, nothing from the scriptlets.
    assert erased.stderr == f"warning: {EXAMPLE} saved as {EXAMPLE}.rpmsave\n", erased.stderr
    assert rpm_root.rpm("-q", "vmagent").returncode == 1
    # %preun (erase, $1 = 0): disabled; the runtime, the command and the unit are gone.
    assert not os.path.lexists(root.file(WANTS))
    for gone in ("/opt/vmagent", "/usr/bin/vmagent", UNIT, EXAMPLE):
        assert not os.path.lexists(root.file(gone)), gone
    # %postun's comment: no purge; the edited config as .rpmsave, the admin's files, the
    # stored identity and the users stay.
    assert root.file(f"{EXAMPLE}.rpmsave").read_text() == edited
    for stays in ("/etc/vmagent/cluster.env", "/etc/vmagent/istio-token", CERT):
        assert root.file(stays).exists(), stays
    assert root.file("/etc/passwd").read_text() == users

    # Installing again with the users, the groups and the config already there: no error.
    rpm_root.install(built.rpm)
    assert root.file("/etc/passwd").read_text() == users
    assert root.file(EXAMPLE).read_text() != edited  # the packaged one
    assert root.file("/etc/vmagent/cluster.env").read_text() == "POD_NAMESPACE=vm\n"
    assert rpm_root.enabled() and rpm_root.verify() == {}

    # And once more over itself (%pre/%post with $1 = 2, the old instance's %preun with 1).
    rpm_root.install("--replacepkgs", built.rpm)
    assert root.file("/etc/passwd").read_text() == users
    assert rpm_root.enabled() and rpm_root.verify() == {}
    assert rpm_root.rpm("-q", "vmagent").stdout.count("\n") == 1


@pytest.fixture
def netns(netns: NetNS) -> NetNS:
    """conftest's namespaces, where the host's python3-rpm can drive rpm (the booted test)."""
    if run("/usr/bin/python3", "-c", "import rpm", check=False).returncode != 0:
        pytest.skip("python3-rpm missing (apt-get install python3-rpm, rpmlint brings it)")
    return netns


def active(machine: Machine) -> str:
    return machine.sh("systemctl is-active vmagent").stdout.strip()


def test_scriptlets_drive_a_running_systemd(
    rpm_root: RpmRoot,
    built: Built,
    rebuilt_packages: tuple[Path, Path],
    keys: Path,
    netns: NetNS,
    tmp_path: Path,
) -> None:
    """The root booted (systemd as PID 1, devmesh beside it) and rpm run against it: what the
    scriptlets' comments promise where systemd runs, through a VM's life."""
    root = rpm_root.root
    with booted(root, netns, tmp_path / "boot.log") as machine:
        rpm_root.leader = machine.leader
        # %post, not configured: enabled, not started, and says what to do.
        fresh = rpm_root.live("-i", built.rpm)
        assert fresh.returncode == 0 and fresh.stderr == "", fresh
        assert "installed and enabled, not started" in fresh.stdout
        assert machine.sh("systemctl is-enabled vmagent").stdout.strip() == "enabled"
        assert active(machine) == "inactive"

        gid = root.gid("vmagent")
        for name, text in onboarding_files(keys, ISTIO_META_DNS_CAPTURE="true").items():
            if name == "hosts":
                with root.file("/etc/hosts").open("a") as hosts:
                    hosts.write(text)
            else:
                root.write(f"/etc/vmagent/{name}", text, 0o640)
                os.chown(root.file(f"/etc/vmagent/{name}"), 0, gid)
        assert machine.sh("systemctl start vmagent").returncode == 0  # returns after READY=1
        first = machine.main_pid()
        assert first and "VMAGENT_OUTPUT" in machine.sh("iptables-save -t nat").stdout

        # %postun of the old package ($1 = 1): the running agent restarts into the new one.
        upgraded = rpm_root.live("-U", rebuilt_packages[1])
        assert (upgraded.returncode, upgraded.stdout, upgraded.stderr) == (0, "", ""), upgraded
        # --no-block: the restart is queued, the upgrade does not wait for READY=1.
        machine.wait_for(
            lambda: active(machine) == "active" and machine.main_pid() not in (0, first),
            60,
            "the agent restarted into the new version",
        )
        assert rpm_root.rpm("-q", "vmagent").stdout.startswith("vmagent-0")
        assert machine.sh("vmagent status").returncode == 0

        # %preun ($1 = 0): stopped (ExecStopPost removed the capture rules) and disabled.
        erased = rpm_root.live("-e", "vmagent")
        assert (erased.returncode, erased.stdout, erased.stderr) == (0, "", ""), erased
        assert active(machine) != "active"
        assert machine.sh("pgrep -u vmagent,vmagent-envoy").stdout == ""
        assert "VMAGENT" not in machine.sh("iptables-save").stdout
        assert not os.path.lexists(root.file(WANTS))
        assert root.file("/etc/vmagent/istio-token").exists()

        # %post, configured (the onboarding files stayed): enabled and started.
        again = rpm_root.live("-i", built.rpm)
        assert (again.returncode, again.stderr) == (0, ""), again
        assert "vmagent status --wait 300" in again.stdout  # started, not waited for
        assert machine.sh("systemctl is-enabled vmagent").stdout.strip() == "enabled"
        assert machine.sh("vmagent status --wait 60").returncode == 0
