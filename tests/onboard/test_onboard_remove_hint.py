"""The removal command onboard prints works as pasted, also for a --hosts-file that is not
/etc/hosts (it used to name only --remove-hosts, which edits /etc/hosts)."""

from __future__ import annotations

import shlex
from pathlib import Path

from onboard_helpers import onboard, onboarding_dir


def test_remove_hint_names_the_hosts_file_it_changed(tmp_path: Path) -> None:
    source = onboarding_dir(tmp_path / "from")
    hosts = tmp_path / "my hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    done = onboard(
        "--from", str(source), "--config-dir", str(tmp_path / "etc"),
        "--hosts-file", str(hosts), "--group", "root",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    hint = done.stdout.split("remove with: ", 1)[1].split(")", 1)[0]
    assert hint == f"vmagent onboard --remove-hosts --hosts-file {shlex.quote(str(hosts))}"
    assert "# BEGIN vmagent onboard" in hosts.read_text()
    removed = onboard(*shlex.split(hint)[2:])
    assert removed.returncode == 0, removed.stderr
    assert hosts.read_text() == "127.0.0.1 localhost\n"
