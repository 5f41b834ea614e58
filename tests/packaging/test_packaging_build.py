"""packaging/build.sh, the .deb and .rpm it makes, and the systemd unit they carry.

Builds both packages once (about a minute on two cores), then inspects them with the
distributions' own tools: ``dpkg-deb -I/-c``, ``rpm -qp``, ``lintian``, ``rpmlint``,
``systemd-analyze verify`` and ``security --offline=true``. The runtime is unpacked with
``dpkg-deb -x`` and run at its final path, /opt/vmagent, inside a private mount namespace
(``unshare -m``), so nothing on this machine is touched. Booting the packages under systemd is
for the boot tests, not here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pkgtools import REPO, Built, run

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]

UNIT = "vmagent.service"
MAX_EXPOSURE = 2.5
# Runs a program with the kernel's "no writable+executable memory" rule (PR_SET_MDWE, Linux
# 6.3+): what MemoryDenyWriteExecute=yes enforces, without systemd.
MDWE_EXEC = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print("MDWE unsupported:", os.strerror(ctypes.get_errno()))
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""


def in_opt(
    root: Path, *command: str | Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with ``root``/opt/vmagent bound onto /opt/vmagent, in a private mount
    namespace over a tmpfs /opt: the venv at its final path, the machine's /opt untouched."""
    script = (
        "set -e; mount --make-rprivate /; mount -t tmpfs pkgtest /opt; mkdir /opt/vmagent; "
        'mount --bind "$VENV" /opt/vmagent; exec "$@"'
    )
    unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    return subprocess.run(
        [*unshare, "bash", "-c", script, "bash", *map(str, command)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "VENV": str(root / "opt" / "vmagent")},
        check=False,
    )


def deb_field(deb: Path, field: str) -> str:
    return run("dpkg-deb", "-f", deb, field).stdout.strip()


def test_packages_are_named_for_the_version(built: Built) -> None:
    upstream, release = built.version.split("-")
    assert built.deb.name == f"vmagent_{upstream}-{release}_amd64.deb"
    assert built.rpm.name == f"vmagent-{upstream}-{release}.x86_64.rpm"
    assert run("rpm", "-qp", "--qf", "%{VERSION}-%{RELEASE} %{ARCH}", built.rpm).stdout == (
        f"{built.version} x86_64"
    )


def test_deb_declares_what_debian_and_ubuntu_need(built: Built) -> None:
    depends = [d.strip() for d in deb_field(built.deb, "Depends").split(",")]
    # The venv runs /usr/bin/python3.11: that package, not "python3" (3.10 on Ubuntu 22.04).
    assert "python3.11" in depends
    # capture runs iptables-restore: the iptables package, not "| nftables" (which lacks it)
    assert "iptables" in depends and not any("nftables" in d for d in depends)
    assert "iproute2" in depends and "adduser" in depends
    libc = [d for d in depends if d.startswith("libc6 (>= 2.")]
    assert libc and float(libc[0].split("2.", 1)[1].rstrip(")")) <= 34, depends  # EL9: 2.34
    assert deb_field(built.deb, "Architecture") == "amd64"
    info = run("dpkg-deb", "-I", built.deb).stdout
    for script in ("postinst", "prerm", "postrm"):
        assert re.search(rf"\*\s+{script}\s+#!/bin/sh", info), info
    assert run("dpkg-deb", "-I", built.deb, "conffiles").stdout.split() == [
        "/etc/vmagent/cluster.env.example"
    ]


def test_deb_files_owners_and_modes(built: Built) -> None:
    listing = run("dpkg-deb", "-c", built.deb).stdout.splitlines()
    entries = {line.split()[5].lstrip("."): line for line in listing}
    assert all(" root/root " in line or " 0/0 " in line for line in listing)
    for path in (
        "/opt/vmagent/bin/vmagent",
        "/opt/vmagent/bin/python3.11 -> /usr/bin/python3.11",
        "/usr/bin/vmagent -> /opt/vmagent/bin/vmagent",
        "/lib/systemd/system/vmagent.service",
        "/etc/vmagent/cluster.env.example",
        "/usr/share/doc/vmagent/copyright",
        "/usr/share/doc/vmagent/changelog.Debian.gz",
    ):
        assert any(line.split(None, 5)[5].lstrip(".") == path for line in listing), path
    assert entries["/etc/vmagent/"].startswith("drwxr-x---")
    envoy = [line for line in listing if line.endswith("/envoy/_bin/envoy")]
    assert envoy and envoy[0].startswith("-rwxr-xr-x")


def test_deb_maintainer_scripts(built: Built, tmp_path: Path) -> None:
    run("dpkg-deb", "-e", built.deb, tmp_path / "control")
    postinst = (tmp_path / "control" / "postinst").read_text()
    assert "adduser --system" in postinst and "vmagent-envoy" in postinst
    assert "deb-systemd-helper enable vmagent.service" in postinst
    # Started only once configured; an upgrade restarts a running agent only.
    assert "elif configured; then" in postinst and "invoke_no_block try-restart" in postinst
    assert 'systemctl --no-block "$1" vmagent.service' in postinst  # never waits for istiod
    assert "deb-systemd-invoke stop vmagent.service" in (tmp_path / "control" / "prerm").read_text()
    postrm = (tmp_path / "control" / "postrm").read_text()
    assert 'if [ "$1" = purge ]' in postrm and "rm -rf /etc/vmagent /var/lib/vmagent" in postrm
    for script in ("postinst", "prerm", "postrm"):
        run("sh", "-n", tmp_path / "control" / script)
        assert os.access(tmp_path / "control" / script, os.X_OK)


def test_rpm_declares_what_el9_needs(built: Built) -> None:
    requires = run("rpm", "-qp", "--requires", built.rpm).stdout.splitlines()
    for need in ("python3.11", "iptables-nft", "iproute", "shadow-utils", "systemd"):
        assert need in requires, requires
    assert any(r.startswith("glibc >= 2.") for r in requires), requires
    files = run("rpm", "-qlp", built.rpm).stdout.splitlines()
    for path in (
        "/opt/vmagent/bin/vmagent",
        "/usr/bin/vmagent",
        "/usr/lib/systemd/system/vmagent.service",
        "/etc/vmagent/cluster.env.example",
    ):
        assert path in files
    assert "/lib/systemd/system/vmagent.service" not in files
    flags = run(
        "rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags} %{FILEUSERNAME}\n]", built.rpm
    ).stdout
    assert re.search(r"^/etc/vmagent/cluster.env.example cn root$", flags, re.M), "noreplace"
    assert all(line.endswith(" root") for line in flags.splitlines())
    scripts = run("rpm", "-qp", "--scripts", built.rpm).stdout
    for section in ("preinstall", "postinstall", "preuninstall", "postuninstall"):
        assert f"{section} scriptlet" in scripts, scripts
    assert "useradd -r -g vmagent " in scripts and "vmagent-envoy" in scripts
    assert "systemctl --no-reload enable vmagent.service" in scripts
    assert "systemctl --no-reload disable --now vmagent.service" in scripts
    assert "systemctl --no-block try-restart vmagent.service" in scripts
    assert "systemctl --no-block start vmagent.service" in scripts


def test_lintian_is_clean(built: Built) -> None:
    result = run("lintian", "--tag-display-limit", "0", built.deb, check=False)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert result.returncode == 0 and not tags, "\n".join(tags) + result.stderr


def test_rpmlint_is_clean(built: Built) -> None:
    result = run("rpmlint", "-c", REPO / "packaging" / "rpmlint.toml", built.rpm, check=False)
    assert result.returncode == 0, result.stdout[-4000:]
    assert re.search(r"0 errors, 0 warnings", result.stdout), result.stdout[-4000:]


def test_runtime_runs_at_its_final_path(built: Built) -> None:
    """The venv works where the package puts it, with the target's interpreter, and nothing
    in it names the build machine's paths."""
    version = run(sys.executable, "-m", "vmagent", "--version").stdout.strip()
    result = in_opt(built.root, "/opt/vmagent/bin/vmagent", "--version")
    assert result.returncode == 0 and result.stdout.strip() == version, result.stderr
    probe = (
        "import sys, vmagent.agent, vmagent.cli\n"
        "from vmagent.envoy.binary import wheel_binary\n"
        "print(sys.prefix, sys.base_prefix, wheel_binary())"
    )
    result = in_opt(built.root, "/opt/vmagent/bin/python", "-c", probe)
    assert result.returncode == 0, result.stderr
    prefix, base, envoy = result.stdout.split()
    assert (prefix, base) == ("/opt/vmagent", "/usr")
    assert envoy.startswith("/opt/vmagent/lib/python3.11/site-packages/envoy/")
    assert re.search(r"version: \S+/1\.\d+\.\d+/", in_opt(built.root, envoy, "--version").stdout)
    named = run(
        "grep", "-rIl", "-e", str(REPO), "-e", "/tmp/vmagent-pkg", built.root / "opt", check=False
    ).stdout
    assert not named, f"files naming the build machine:\n{named}"


def test_unit_verifies_cleanly(built: Built) -> None:
    unit = built.root / "lib" / "systemd" / "system" / UNIT
    assert unit.read_text() == (REPO / "systemd" / UNIT).read_text()
    # ExecStart= must exist: verify with the package's /opt/vmagent in place.
    result = in_opt(built.root, "systemd-analyze", "verify", unit)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_unit_exposure_is_at_most_2_5() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze missing: apt-get install systemd")
    result = run(
        "systemd-analyze", "security", "--offline=true", REPO / "systemd" / UNIT, check=False
    )
    match = re.search(r"Overall exposure level for vmagent\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_asks_for_what_the_issue_names() -> None:
    lines = set((REPO / "systemd" / UNIT).read_text().splitlines())
    for line in (
        "Type=notify",
        "Restart=always",
        "User=vmagent",
        "WatchdogSec=30s",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "StateDirectory=vmagent",
        "RuntimeDirectory=vmagent",
        "ConfigurationDirectory=vmagent",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "SystemCallFilter=@system-service",
        "SystemCallArchitectures=native",
        "MemoryDenyWriteExecute=yes",
        "ExecStopPost=-/opt/vmagent/bin/vmagent capture clean",
    ):
        assert line in lines, line


def test_runtime_needs_no_writable_executable_memory(built: Built, tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes holds for Python and Envoy: both run under PR_SET_MDWE,
    which refuses a writable+executable mapping (checked first, so the rule is in force)."""
    helper = tmp_path / "mdwe.py"
    helper.write_text(MDWE_EXEC)
    wx = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    control = in_opt(built.root, "/usr/bin/python3.11", helper, "/usr/bin/python3.11", "-c", wx)
    if control.returncode == 77:
        pytest.skip(control.stdout.strip() + " (kernel older than 6.3)")
    assert control.returncode != 0 and "PermissionError" in control.stderr, control.stderr
    work = (
        "import grpc, vmagent.agent, vmagent.cli\n"
        "from cryptography.hazmat.primitives.asymmetric import ec\n"
        "ec.generate_private_key(ec.SECP256R1())\n"
        "grpc.insecure_channel('127.0.0.1:1').close()\n"
        "print('ok')"
    )
    result = in_opt(
        built.root, "/usr/bin/python3.11", helper, "/opt/vmagent/bin/python", "-c", work
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    envoy = "/opt/vmagent/lib/python3.11/site-packages/envoy/_bin/envoy"
    bootstrap = "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}"
    # Envoy serving for 3 s (timeout's exit 124: still alive when stopped).
    result = in_opt(
        built.root,
        "timeout",
        "3",
        "/usr/bin/python3.11",
        helper,
        envoy,
        "--config-yaml",
        bootstrap,
        "--base-id-path",
        tmp_path / "base-id",
        "--use-dynamic-base-id",
        "-l",
        "info",
        timeout=60,
    )
    assert result.returncode == 124, result.stderr[-3000:]
    assert "starting main dispatch loop" in result.stderr, result.stderr[-3000:]
