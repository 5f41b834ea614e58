"""The pure core of ``vmagent onboard``: the /etc/hosts block and the file checks, with
``now`` passed in."""

from __future__ import annotations

import time

import pytest
from onboard_helpers import FIXTURES, make_cert, make_token

from vmagent.onboard import core, hosts

ENTRY = (hosts.HostEntry("10.10.10.11", ("istiod-rev-1.istio-system.svc",)),)
BLOCK = hosts.BEGIN + b"\n10.10.10.11 istiod-rev-1.istio-system.svc\n" + hosts.END + b"\n"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"", BLOCK),
        (b"127.0.0.1 localhost\n", b"127.0.0.1 localhost\n" + BLOCK),
        (b"127.0.0.1 localhost", b"127.0.0.1 localhost\n" + BLOCK),  # no final newline
        (b"a\r\n" + BLOCK + b"b\r\n", b"a\r\n" + BLOCK + b"b\r\n"),  # already there
        (  # two blocks (edited by hand): one left, where the first stood
            b"a\n" + hosts.BEGIN + b"\n1.1.1.1 x\n" + hosts.END + b"\nb\n" + BLOCK + b"c",
            b"a\n" + BLOCK + b"b\nc",
        ),
    ],
)
def test_onboard_set_block(before: bytes, after: bytes) -> None:
    assert hosts.set_block(before, ENTRY, "hosts") == after
    assert hosts.set_block(after, ENTRY, "hosts") == after  # idempotent
    assert BLOCK not in hosts.remove_block(after, "hosts")


def test_onboard_remove_block_keeps_every_other_byte() -> None:
    admin = b"127.0.0.1 localhost\n\xff odd bytes # kept\n\n"
    assert hosts.remove_block(admin, "hosts") == admin
    assert hosts.remove_block(admin + BLOCK + b"tail", "hosts") == admin + b"tail"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (hosts.BEGIN + b"\n1.1.1.1 x\n", 1),
        (b"x\n" + hosts.END + b"\n", 2),
        (hosts.BEGIN + b"\n" + hosts.BEGIN + b"\n" + hosts.END + b"\n", 2),
    ],
)
def test_onboard_broken_markers_name_the_line(text: bytes, line: int) -> None:
    with pytest.raises(hosts.HostsError, match=f"^hosts:{line}: "):
        hosts.set_block(text, ENTRY, "hosts")
    with pytest.raises(hosts.HostsError, match=f"^hosts:{line}: "):
        hosts.remove_block(text, "hosts")


def test_onboard_conflicts_only_for_another_address_outside_the_block() -> None:
    text = (
        b"10.10.10.11 istiod-rev-1.istio-system.svc\n"  # same address: fine
        b"# 10.0.0.9 istiod-rev-1.istio-system.svc (a comment)\n"
        + BLOCK.replace(b"10.10.10.11", b"10.0.0.8")  # our old block: replaced, not a conflict
        + b"10.0.0.7 other ISTIOD-REV-1.istio-system.svc.\n"
    )
    assert hosts.conflicts(text, ENTRY, "hosts") == [
        "hosts:6: istiod-rev-1.istio-system.svc is already listed with 10.0.0.7 (left as it is);"
        " that line wins over the onboard block's 10.10.10.11: remove it if stale"
    ]


def test_onboard_parse_hosts() -> None:
    text = "# istioctl\n\n10.0.0.1 a.svc b # c\nfe80::1%eth0 z\n"
    assert hosts.parse_hosts(text, "hosts") == (
        hosts.HostEntry("10.0.0.1", ("a.svc", "b")),
        hosts.HostEntry("fe80::1%eth0", ("z",)),
    )
    fixture = (FIXTURES / "ipv4" / "hosts").read_text()  # no final newline, as istioctl writes
    assert hosts.parse_hosts(fixture, "hosts") == ENTRY


def _files(**changed: bytes | None) -> dict[str, bytes | None]:
    files: dict[str, bytes | None] = {
        name: (FIXTURES / "ipv4" / name).read_bytes()
        for name in ("cluster.env", "mesh.yaml", "hosts")
    }
    files["root-cert.pem"] = make_cert()
    files["istio-token"] = make_token()
    files.update({name.replace("_", "-").replace("-env", ".env"): v for name, v in changed.items()})
    return files


def test_onboard_check_files_takes_now() -> None:
    now = time.time()
    good = core.check_files(_files(), "/src", now)
    assert good.errors == () and good.hosts == ENTRY
    assert good.notes and "JWT, expires" in good.notes[0]
    later = core.check_files(_files(), "/src", now + 3600 - 90)  # the token's last two minutes
    assert later.errors == ()
    assert any("the token expires in 1 min" in w for w in later.warnings)
    expired = core.check_files(_files(), "/src", now + 3601)
    assert [e.split(":")[0] for e in expired.errors] == ["/src/istio-token"]
    past_root = core.check_files(_files(), "/src", now + 400 * 86400)
    assert any(e.startswith("/src/root-cert.pem: certificate 1") for e in past_root.errors)


def test_onboard_check_files_empty_hosts_is_a_warning() -> None:
    checked = core.check_files(_files(hosts=b"\n"), "/src", time.time())
    assert checked.errors == () and checked.hosts == ()
    assert any("no entries" in w and "--ingressIP" in w for w in checked.warnings)


def test_onboard_plan_files() -> None:
    old = core.Existing(b"old", 0, 0, 0o644)
    same = core.Existing(b"new", 0, 5, 0o640)
    files = dict.fromkeys(core.INSTALLED, b"new")
    plan = core.plan_files(
        files, {"cluster.env": old, "mesh.yaml": same, "root-cert.pem": None}, uid=0, gid=None
    )
    kinds = {a.name: (a.kind, a.gid, a.backup, a.fix) for a in plan}
    assert kinds == {
        "cluster.env": ("replace", 0, "cluster.env.vmagent-old", False),
        "mesh.yaml": ("unchanged", 5, None, False),  # no vmagent group: its group is kept
        "root-cert.pem": ("install", None, None, False),
        "istio-token": ("install", None, None, False),
    }
    assert all(a.mode == 0o640 for a in plan)
    fixed = core.plan_files(files, dict.fromkeys(core.INSTALLED, same), uid=0, gid=7)
    assert all(a.kind == "unchanged" and a.fix for a in fixed)


def test_onboard_expired_token_says_how_long_ago() -> None:
    """The wording the CLI test only matches loosely (its token is made minutes before a
    whole-suite run reaches it), exactly, with ``now`` given."""
    issued = 1_800_000_000.0
    token = make_token(lifetime=3600, now=issued).decode()
    with pytest.raises(core.OnboardError, match=r"^t: the token expired 2 min ago "):
        core.check_token(token, "t", issued + 3600 + 150)
    warnings, _ = core.check_token(token, "t", issued + 3600 - 90)
    assert warnings and "the token expires in 1 min" in warnings[0]


def test_onboard_cluster_env_reports_every_bad_line() -> None:
    text = "POD_NAMESPACE='bar'\nNOT A KEY\nSERVICE_ACCOUNT='sa'\nCA_ADDR='x\nISTIO_SVC_IP='nope'\n"
    errors = core.check_cluster_env(text, "c")
    assert [e.split(": ")[0] for e in errors] == ["c:2", "c:4", "c:5"], errors
    assert "expected KEY=value" in errors[0] and "bad quoting" in errors[1]
    assert "ISTIO_SVC_IP='nope'" in errors[2]


def test_onboard_hosts_lines_say_what_to_do_for_every_bad_line() -> None:
    entries, errors = hosts.hosts_lines("10.0.0.1 ok.svc\n10.0.0.300 a\n10.0.0.2\n", "h")
    assert entries == (hosts.HostEntry("10.0.0.1", ("ok.svc",)),)
    assert [e.split(": ")[0] for e in errors] == ["h:2", "h:3"]
    assert all("expected 'IP NAME [NAME...]'" in e and "fix or delete the line" in e
               for e in errors)


def test_onboard_empty_hosts_warning_names_the_hosts_file() -> None:
    checked = core.check_files(_files(hosts=b""), "/src", time.time(), hosts_file="/tmp/h")
    assert any("/tmp/h is left as it is" in w for w in checked.warnings), checked.warnings
    assert not any("/etc/hosts" in w for w in checked.warnings)


def test_onboard_action_rows_never_run_together() -> None:
    for verb in ("would install", "would replace", "would create", "installed", "kept"):
        line = core.row(verb, "/etc/vmagent/cluster.env")
        assert line.startswith(verb + " ") and line.index("/") == core.VERB_WIDTH
