"""``vmagent onboard --from DIR``, run as the real command (.venv/bin/vmagent) on istioctl's
real output: what lands where, with which owner and mode, what /etc/hosts becomes, and that
``vmagent config show`` then reads the installed files."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from onboard_helpers import (
    FIXTURES,
    VMAGENT,
    clean_env,
    make_cert,
    onboard,
    onboarding_dir,
    snapshot,
)

from vmagent.config import load_config

INSTALLED = ("cluster.env", "mesh.yaml", "root-cert.pem", "istio-token")
ADMIN = b"127.0.0.1\tlocalhost\n# the admin's comment \xe9\n::1 localhost ip6-localhost\r\n"
BEGIN = b"# BEGIN vmagent onboard (istioctl hosts; remove with: vmagent onboard --remove-hosts)\n"
END = b"# END vmagent onboard\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to root:daemon needs root")


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(istioctl's output dir, config dir to be created, hosts file with the admin's lines)."""
    hosts = tmp_path / "hosts"
    hosts.write_bytes(ADMIN)
    return onboarding_dir(tmp_path / "from"), tmp_path / "etc" / "vmagent", hosts


def _args(source: Path, config: Path, hosts: Path, *more: str) -> list[str]:
    return ["--from", str(source), "--config-dir", str(config), "--hosts-file", str(hosts), *more]


@needs_root
def test_onboard_installs_files_with_owner_mode_and_hosts_block(
    site: tuple[Path, Path, Path],
) -> None:
    source, config, hosts = site
    done = onboard(*_args(source, config, hosts, "--group", "daemon"))
    assert done.returncode == 0, done.stderr
    daemon = grp.getgrnam("daemon").gr_gid
    info = config.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o750, 0, daemon)
    for name in INSTALLED:
        info = (config / name).stat()
        assert (config / name).read_bytes() == (source / name).read_bytes()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 0, daemon), name
        assert f"installed     {config / name}  root:daemon 0640" in done.stdout
    entry = b"10.10.10.11 istiod-rev-1.istio-system.svc\n"
    assert hosts.read_bytes() == ADMIN + BEGIN + entry + END
    assert "systemctl start --no-block vmagent" in done.stdout  # no agent answers
    assert "vmagent status --wait 120" in done.stdout
    assert "JWT, expires" in done.stdout  # the token's lifetime is shown
    assert not list(config.glob(".*"))  # no temporary file left behind


def test_onboard_files_are_what_vmagent_config_show_reads(site: tuple[Path, Path, Path]) -> None:
    source, config, hosts = site
    assert onboard(*_args(source, config, hosts)).returncode == 0
    env = clean_env(VMAGENT_CONFIG_DIR=str(config))
    shown = subprocess.run(
        [str(VMAGENT), "config", "show"], capture_output=True, text=True, env=env, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines()}
    assert f"file:{config}/cluster.env" in rows["SERVICE_ACCOUNT"]
    assert "'vm-serviceaccount'" in rows["SERVICE_ACCOUNT"]
    assert f"'{config}/root-cert.pem'" in rows["XDS_ROOT_CA"]
    assert f"'{config}/istio-token'" in rows["VMAGENT_TOKEN_FILE"]
    # mesh.yaml: the agent's own loader finds it there (readinessProbe is only in mesh.yaml).
    loaded = load_config({"VMAGENT_CONFIG_DIR": str(config)}, root=config)
    assert [f.path for f in loaded.files] == [str(config / n) for n in INSTALLED]
    assert dict(loaded.proxy_config.readiness_probe or {}) == {"httpGet": {"port": 8080}}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_onboard_without_vmagent_group_keeps_group_and_says_so(
    site: tuple[Path, Path, Path],
) -> None:
    try:
        grp.getgrnam("vmagent")
        pytest.skip("this machine has a vmagent group")
    except KeyError:
        pass
    source, config, hosts = site
    done = onboard(*_args(source, config, hosts))
    assert done.returncode == 0, done.stderr
    assert "group 'vmagent' does not exist" in done.stderr and "--group" in done.stderr
    info = (config / "istio-token").stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 0, 0)


def test_onboard_twice_is_idempotent_and_replacing_keeps_old_copy(
    site: tuple[Path, Path, Path],
) -> None:
    source, config, hosts = site
    assert onboard(*_args(source, config, hosts)).returncode == 0
    before = snapshot(config, hosts)
    again = onboard(*_args(source, config, hosts))
    assert again.returncode == 0, again.stderr
    assert snapshot(config, hosts) == before
    assert again.stdout.count("unchanged") == 6  # directory, four files, hosts
    assert hosts.read_bytes().count(b"# BEGIN vmagent onboard") == 1

    old_root = (config / "root-cert.pem").read_bytes()
    (source / "root-cert.pem").write_bytes(make_cert())
    (source / "hosts").write_text("10.10.10.12 istiod-rev-1.istio-system.svc istiod.example\n")
    third = onboard(*_args(source, config, hosts))
    assert third.returncode == 0, third.stderr
    backup = config / "root-cert.pem.vmagent-old"
    assert f"replaced      {config / 'root-cert.pem'}" in third.stdout
    assert "old copy kept as root-cert.pem.vmagent-old" in third.stdout
    assert backup.read_bytes() == old_root
    assert stat.S_IMODE(backup.stat().st_mode) == 0o640
    assert (config / "root-cert.pem").read_bytes() == (source / "root-cert.pem").read_bytes()
    # One block, replaced where it stood; the admin's lines byte for byte.
    assert hosts.read_bytes() == (
        ADMIN + BEGIN + b"10.10.10.12 istiod-rev-1.istio-system.svc istiod.example\n" + END
    )


def test_onboard_hosts_block_replaced_in_place_keeps_mode_and_rest(
    site: tuple[Path, Path, Path],
) -> None:
    source, config, hosts = site
    after = b"10.1.1.1 db.internal\n# last line without newline"
    hosts.write_bytes(ADMIN + BEGIN + b"10.9.9.9 old.name\n" + END + after)
    os.chmod(hosts, 0o604)
    if os.geteuid() == 0:
        os.chown(hosts, 1, 1)
    owner = hosts.stat()
    assert onboard(*_args(source, config, hosts)).returncode == 0
    assert hosts.read_bytes() == (
        ADMIN + BEGIN + b"10.10.10.11 istiod-rev-1.istio-system.svc\n" + END + after
    )
    info = hosts.stat()
    assert (info.st_mode, info.st_uid, info.st_gid) == (owner.st_mode, owner.st_uid, owner.st_gid)

    removed = onboard("--remove-hosts", "--hosts-file", str(hosts))
    assert removed.returncode == 0, removed.stderr
    assert "removed" in removed.stdout
    assert hosts.read_bytes() == ADMIN + after
    assert hosts.stat().st_mode == owner.st_mode
    again = onboard("--remove-hosts", "--hosts-file", str(hosts))
    assert again.returncode == 0 and "no vmagent onboard block" in again.stdout


def test_onboard_warns_about_admin_line_for_same_name(site: tuple[Path, Path, Path]) -> None:
    source, config, hosts = site
    admin = ADMIN + b"10.0.0.1 istiod-rev-1.istio-system.svc\n"
    hosts.write_bytes(admin)
    done = onboard(*_args(source, config, hosts))
    assert done.returncode == 0, done.stderr
    assert f"{hosts}:4: istiod-rev-1.istio-system.svc is already listed with 10.0.0.1" in (
        done.stderr
    )
    assert hosts.read_bytes().startswith(admin)  # the admin's line is not edited


def test_onboard_dry_run_changes_nothing(site: tuple[Path, Path, Path]) -> None:
    source, config, hosts = site
    before = snapshot(config.parent, hosts)
    done = onboard(*_args(source, config, hosts, "--dry-run"))
    assert done.returncode == 0, done.stderr
    assert "would install" in done.stdout and "would update" in done.stdout
    assert "nothing was changed" in done.stdout
    assert snapshot(config.parent, hosts) == before
    assert not config.exists()
    hosts.write_bytes(ADMIN + BEGIN + END)
    dry_remove = onboard("--remove-hosts", "--dry-run", "--hosts-file", str(hosts))
    assert dry_remove.returncode == 0 and "would remove" in dry_remove.stdout
    assert hosts.read_bytes() == ADMIN + BEGIN + END


def test_onboard_ipv6_files(site: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, config, hosts = site
    source = onboarding_dir(tmp_path / "v6", "ipv6")
    done = onboard(*_args(source, config, hosts))
    assert done.returncode == 0, done.stderr
    assert BEGIN + b"fd00:10:96::2 istiod-rev-1.istio-system.svc\n" + END in hosts.read_bytes()
    assert (config / "cluster.env").read_bytes() == (FIXTURES / "ipv6/cluster.env").read_bytes()


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the user nobody (65534) owns and can reach (pytest's tmp_path is 0700)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("running as nobody needs root and setpriv (util-linux)")
    top = Path(tempfile.mkdtemp(prefix="vmagent-onboard-"))
    try:
        os.chmod(top, 0o755)
        os.chown(top, 65534, 65534)
        yield top
    finally:
        shutil.rmtree(top)


def test_onboard_as_non_root(nobody_dir: Path) -> None:
    source = onboarding_dir(nobody_dir / "from")
    hosts = nobody_dir / "hosts"
    hosts.write_bytes(ADMIN)
    for path in [source, *source.iterdir(), hosts]:
        os.chown(path, 65534, 65534)
    config = nobody_dir / "cfg"

    refused = onboard("--from", str(source), "--hosts-file", str(hosts), as_nobody=True)
    assert refused.returncode == 2
    assert "needs root" in refused.stderr and "sudo vmagent onboard" in refused.stderr
    assert hosts.read_bytes() == ADMIN

    to_etc = onboard("--from", str(source), "--config-dir", str(config), as_nobody=True)
    assert to_etc.returncode == 2  # /etc/hosts is not nobody's to write
    assert "/etc: not writable by nobody" in to_etc.stderr and "--no-hosts" in to_etc.stderr
    assert not config.exists()

    done = onboard(*_args(source, config, hosts), as_nobody=True)
    assert done.returncode == 0, done.stderr
    assert "chown skipped" in done.stdout
    for name in INSTALLED:
        info = (config / name).stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o640, 65534)
    assert stat.S_IMODE(config.stat().st_mode) == 0o750
    assert BEGIN in hosts.read_bytes()


def test_onboard_dry_run_as_non_root_checks_files_and_says_root_is_needed(
    nobody_dir: Path,
) -> None:
    source = onboarding_dir(nobody_dir / "from")
    for path in [source, *source.iterdir()]:  # nobody's, whatever the umask made them
        os.chown(path, 65534, 65534)
    config = nobody_dir / "root-owned"  # nobody may read it, not write it
    config.mkdir()
    os.chmod(config, 0o755)  # not mkdir(mode=): the umask would take bits away
    env = clean_env(VMAGENT_CONFIG_DIR=str(config))
    dry = onboard("--from", str(source), "--dry-run", "--no-hosts", env=env, as_nobody=True)
    assert dry.returncode == 0, dry.stderr
    assert f"{config}: not writable by nobody" in dry.stderr
    assert "a real run would stop here" in dry.stderr
    assert "would install" in dry.stdout
    real = onboard("--from", str(source), "--no-hosts", env=env, as_nobody=True)
    assert real.returncode == 2 and f"{config}: not writable by nobody" in real.stderr
    assert list(config.iterdir()) == []


def test_onboard_no_hosts_needs_no_hosts_file(site: tuple[Path, Path, Path]) -> None:
    source, config, hosts = site
    (source / "hosts").unlink()
    done = onboard("--from", str(source), "--config-dir", str(config), "--no-hosts")
    assert done.returncode == 0, done.stderr
    assert hosts.read_bytes() == ADMIN and (config / "istio-token").exists()
