"""What a first-time user ran into: inputs that are not regular files (a FIFO hung onboard
forever), relative and wrong ``--config-dir``, a missing hosts file, the output's wording
(dry-run lines, absolute paths, the closing hint), and errors reported once and all."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from onboard_helpers import clean_env, onboard, onboarding_dir, snapshot

HOSTS = b"127.0.0.1 localhost\n"
ROW = re.compile(r"^(would \w+|\w+) +(/\S*)")  # an action line: verb, spaces, absolute path


def _site(tmp_path: Path) -> tuple[Path, Path, Path]:
    hosts = tmp_path / "hosts"
    hosts.write_bytes(HOSTS)
    return onboarding_dir(tmp_path / "from"), tmp_path / "etc" / "vmagent", hosts


def _args(source: Path, config: Path, hosts: Path, *more: str) -> list[str]:
    return ["--from", str(source), "--config-dir", str(config), "--hosts-file", str(hosts), *more]


def _refused(done: subprocess.CompletedProcess[str], tmp_path: Path, before: object) -> None:
    """Exit 2, the last line says nothing was changed, and nothing was."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.endswith("vmagent onboard: nothing was changed\n")
    assert snapshot(tmp_path / "etc", tmp_path / "hosts") == before


@pytest.mark.parametrize("name", ["cluster.env", "root-cert.pem", "istio-token", "hosts"])
@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: os.mkfifo(p), "not a regular file: a FIFO (named pipe)"),
        (lambda p: p.mkdir(), "not a regular file: a directory"),
        (lambda p: p.symlink_to("/dev/null"), "not a regular file: a character device "
         "(symlink to /dev/null)"),
        (lambda p: p.symlink_to("gone"), "dangling symlink to gone (= "),
    ],
    ids=["fifo", "directory", "devnull", "dangling"],
)
def test_onboard_input_that_is_not_a_regular_file_is_one_clear_error(
    tmp_path: Path, name: str, make: object, words: str
) -> None:
    source, config, hosts = _site(tmp_path)
    (source / name).unlink()
    make(source / name)  # type: ignore[operator]
    before = snapshot(tmp_path / "etc", hosts)
    done = onboard(*_args(source, config, hosts), timeout=20)  # a FIFO used to block forever
    _refused(done, tmp_path, before)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [f"vmagent onboard: error: {source / name}: {words}" + errors[0].split(
        words, 1)[1]], done.stderr  # one error for the file, the real one
    assert "istioctl" in errors[0]  # what to do


def test_onboard_symlinked_input_files_are_followed(tmp_path: Path) -> None:
    source, config, hosts = _site(tmp_path)
    real = tmp_path / "elsewhere"
    real.mkdir()
    (source / "cluster.env").rename(real / "cluster.env")
    (source / "cluster.env").symlink_to(real / "cluster.env")
    done = onboard(*_args(source, config, hosts))
    assert done.returncode == 0, done.stderr
    assert (config / "cluster.env").read_bytes() == (real / "cluster.env").read_bytes()
    assert not (config / "cluster.env").is_symlink()


@pytest.mark.parametrize("kind", ["fifo", "directory", "missing"])
def test_onboard_hosts_file_must_be_an_existing_regular_file(tmp_path: Path, kind: str) -> None:
    source, config, hosts = _site(tmp_path)
    target = tmp_path / "other-hosts"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    before = snapshot(tmp_path / "etc", hosts)
    done = onboard(*_args(source, config, target), timeout=20)
    _refused(done, tmp_path, before)
    expected = {"fifo": "not a regular file: a FIFO", "directory": "not a regular file: a "
                "directory", "missing": "no such file"}[kind]
    assert f"{target}: {expected}" in done.stderr and "--hosts-file" in done.stderr
    removed = onboard("--remove-hosts", "--hosts-file", str(target), timeout=20)
    assert removed.returncode == 2 and f"{target}: {expected}" in removed.stderr
    assert removed.stderr.endswith("nothing was changed\n")


def test_onboard_remove_hosts_from_a_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "hosts"
    done = onboard("--remove-hosts", "--hosts-file", str(missing))
    assert done.returncode == 2, done.stdout
    assert f"{missing}: no such file; --hosts-file must name an existing hosts file" in (
        done.stderr
    )
    assert "unchanged" not in done.stdout


def test_onboard_dry_run_and_real_run_lines_are_well_formed(tmp_path: Path) -> None:
    source, config, hosts = _site(tmp_path)
    for flags in (["--dry-run"], [], []):  # would..., then done, then unchanged
        done = onboard(*_args(source, config, hosts, *flags))
        assert done.returncode == 0, done.stderr
        rows = [line for line in done.stdout.splitlines() if ROW.match(line)]
        assert len(rows) == 6, done.stdout  # directory, four files, hosts
        for line in rows:
            verb = ROW.match(line).group(1)  # type: ignore[union-attr]
            assert verb in {"would create", "would install", "would update", "created",
                            "installed", "updated", "unchanged"}, line
            assert line.index("/") == 14, line  # one column: never "would installcfg/..."
    dry = onboard(*_args(source, config, hosts, "--dry-run"))
    assert "would install" not in dry.stdout  # all unchanged now
    assert dry.stdout.splitlines()[-1] == "dry run: nothing was changed"


def test_onboard_relative_paths_are_printed_absolute(tmp_path: Path) -> None:
    source, _, hosts = _site(tmp_path)
    env = clean_env(VMAGENT_CONFIG_DIR="/etc/vmagent", VMAGENT_RUN_DIR=str(tmp_path / "run"))
    done = onboard("--from", "from", "--config-dir", "cfg", "--hosts-file", "hosts",
                   cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert f"set VMAGENT_CONFIG_DIR={tmp_path / 'cfg'} in its environment" in done.stdout
    assert f"installed     {tmp_path / 'cfg' / 'cluster.env'}  " in done.stdout
    assert f"note: {source}/istio-token: JWT" in done.stdout
    assert f"updated       {hosts} (" in done.stdout
    bad = onboard("--from", "from", "--config-dir", "cfg", "--hosts-file", "nohosts",
                  cwd=tmp_path, env=env)
    assert f"error: {tmp_path / 'nohosts'}: no such file" in bad.stderr


def test_onboard_config_dir_that_is_a_file_is_refused_clearly(tmp_path: Path) -> None:
    source, _, hosts = _site(tmp_path)
    afile = tmp_path / "etc"
    afile.write_bytes(b"not a directory\n")
    before = snapshot(afile, hosts)
    done = onboard(*_args(source, afile, hosts))
    _refused(done, tmp_path, before)
    assert f"--config-dir {afile}: not a directory: a regular file; name a directory" in (
        done.stderr
    )
    assert "cannot read" not in done.stderr and "Not a directory" not in done.stderr
    below = onboard(*_args(source, afile / "vmagent", hosts))
    _refused(below, tmp_path, before)
    assert f"--config-dir {afile / 'vmagent'}: cannot be created: {afile} is a regular file" in (
        below.stderr
    )


def test_onboard_installed_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    source, config, hosts = _site(tmp_path)
    (config / "istio-token").mkdir(parents=True)
    before = snapshot(tmp_path / "etc", hosts)
    done = onboard(*_args(source, config, hosts))
    _refused(done, tmp_path, before)
    assert f"{config / 'istio-token'}: not a regular file: a directory; move it away" in (
        done.stderr
    )


def test_onboard_reports_every_bad_line_of_cluster_env_and_hosts(tmp_path: Path) -> None:
    source, config, hosts = _site(tmp_path)
    with (source / "cluster.env").open("ab") as out:
        out.write(b"NOT A KEY\nISTIO_SVC_IP='not-an-ip'\nCA_ADDR='unterminated\n")
    (source / "hosts").write_bytes(b"10.0.0.300 a.svc\n10.0.0.1\n")
    before = snapshot(tmp_path / "etc", hosts)
    done = onboard(*_args(source, config, hosts))
    _refused(done, tmp_path, before)
    for where in ("cluster.env:22: expected KEY=value", "cluster.env:23: ISTIO_SVC_IP",
                  "cluster.env:24: CA_ADDR: bad quoting", "hosts:1: '10.0.0.300'",
                  "hosts:2: no name after 10.0.0.1"):
        assert f"{source}/{where}" in done.stderr, (where, done.stderr)


def test_onboard_empty_hosts_warning_names_the_hosts_file_used(tmp_path: Path) -> None:
    source, config, hosts = _site(tmp_path)
    (source / "hosts").write_bytes(b"")
    done = onboard(*_args(source, config, hosts))
    assert done.returncode == 0, done.stderr
    assert f"{hosts} is left as it is" in done.stderr and "/etc/hosts" not in done.stderr
    assert hosts.read_bytes() == HOSTS


def test_onboard_closing_hint_starts_or_restarts(tmp_path: Path) -> None:
    source, config, hosts = _site(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    env = clean_env(VMAGENT_RUN_DIR=str(run))
    stopped = onboard(*_args(source, config, hosts), env=env)
    assert stopped.returncode == 0, stopped.stderr
    lines = stopped.stdout.splitlines()
    assert lines[-2].startswith("next: sudo systemctl start --no-block vmagent ")
    assert lines[-1].strip() == "vmagent status --wait 120"
    assert "enable" not in stopped.stdout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(run / "status.sock"))
        stale = onboard(*_args(source, config, hosts), env=env)  # a socket nobody accepts on
        assert "systemctl start --no-block vmagent" in stale.stdout, stale.stdout
        listener.listen(1)
        running = onboard(*_args(source, config, hosts), env=env)
    assert running.returncode == 0, running.stderr
    assert "next: sudo systemctl restart --no-block vmagent   (it is running" in running.stdout
