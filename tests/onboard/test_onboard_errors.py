"""Bad onboarding input: ``vmagent onboard`` exits 2, names the file (and line or key) and
what to do, and installs nothing (no config directory, /etc/hosts untouched)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from onboard_helpers import make_cert, make_token, onboard, onboarding_dir, snapshot

HOSTS = b"127.0.0.1 localhost\n"


def _break(
    source: Path, name: str, data: bytes | Callable[[], bytes] | None, append: bool = False
) -> None:
    path = source / name
    if data is None:
        path.unlink()
    else:
        new = data() if callable(data) else data
        path.write_bytes((path.read_bytes() if append else b"") + new)


# Content depending on the clock is made when the case runs, not when this module is collected:
# a whole-suite run reaches these tests minutes after collection (CI: the token said "expired
# 4 min ago", not 2). The exact minutes are checked in test_onboard_core with `now` given.
BAD: dict[str, tuple[str, bytes | Callable[[], bytes] | None, bool, list[str]]] = {
    # case: (file, new content, a maker of it, or None to delete, append?, words the error
    # must contain; a word starting with "re:" is a regular expression)
    "missing cluster.env": ("cluster.env", None, False, ["cluster.env: missing", "istioctl"]),
    "missing istio-token": ("istio-token", None, False, ["istio-token: missing"]),
    "missing hosts": ("hosts", None, False, ["hosts: missing"]),
    "garbage cluster.env key": (
        "cluster.env", b"NOT A KEY\n", True, ["cluster.env:22: expected KEY=value"]
    ),
    "bad cluster.env value": (
        "cluster.env", b"ISTIO_SVC_IP='not-an-ip'\n", True, ["cluster.env:22: ISTIO_SVC_IP"]
    ),
    "bad cluster.env quoting": (
        "cluster.env", b"CA_ADDR='unterminated\n", True, ["cluster.env:22: CA_ADDR: bad quoting"]
    ),
    "rule between settings": (
        "cluster.env", b"DNS_PROXY_ADDR='10.0.0.5:15053'\n", True,
        ["the files together", "DNS_PROXY_ADDR", "not a loopback address"],
    ),
    "invalid mesh.yaml": (
        "mesh.yaml", b"defaultConfig: [1\n", False, ["mesh.yaml: not valid YAML"]
    ),
    "mesh.yaml bad discoveryAddress": (
        "mesh.yaml",
        b"defaultConfig:\n  discoveryAddress: 'no port here'\n",
        False,
        ["mesh.yaml: defaultConfig: discoveryAddress"],
    ),
    "mesh.yaml bad proxyMetadata": (
        "mesh.yaml",
        b"defaultConfig:\n  proxyMetadata:\n    ISTIO_META_DNS_CAPTURE: maybe\n",
        False,
        ["mesh.yaml: defaultConfig.proxyMetadata", "ISTIO_META_DNS_CAPTURE"],
    ),
    "non-PEM root cert": ("root-cert.pem", b"hello\n", False, ["root-cert.pem: not PEM"]),
    "workload cert as root": (
        "root-cert.pem", lambda: make_cert(ca=False), False,
        ["root-cert.pem", "not a CA certificate"],
    ),
    "expired root cert": (
        "root-cert.pem", lambda: make_cert(days_before=20, days_after=-1), False,
        ["root-cert.pem", "expired on"],
    ),
    "expired token": (
        "istio-token", lambda: make_token(lifetime=-150), False,
        ["re:istio-token: the token expired [0-9]+ min ago", "istioctl x workload entry configure"],
    ),
    "empty token": ("istio-token", b"\n", False, ["istio-token: empty"]),
    "bad hosts IP": (
        "hosts", b"10.10.10.300 istiod.istio-system.svc\n", False,
        ["hosts:1: '10.10.10.300' is not an IP address", "fix or delete the line"],
    ),
    "hosts IP without name": (
        "hosts", b"\n10.0.0.1\n", False, ["hosts:2: no name after", "IP NAME [NAME...]"]
    ),
    "bad hosts name": ("hosts", b"10.0.0.1 bad_na me!\n", False, ["hosts:1: 'me!'"]),
    "empty cluster.env": (
        "cluster.env", b"# nothing else\n", False,
        ["cluster.env: no settings at all (empty)", "writes POD_NAMESPACE and SERVICE_ACCOUNT"],
    ),
    "cluster.env without identity": (
        "cluster.env", b"ISTIO_SERVICE='foo.bar'\n", False,
        ["cluster.env: no POD_NAMESPACE, no SERVICE_ACCOUNT: istioctl always writes"],
    ),
    "empty namespace": (  # set, but empty: mesh.yaml's POD_NAMESPACE is overridden
        "cluster.env", b"POD_NAMESPACE=''\nISTIO_NAMESPACE=''\n", True,
        ["cluster.env: POD_NAMESPACE or ISTIO_NAMESPACE: missing or empty", "'default'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_onboard_bad_input_exits_2_and_installs_nothing(case: str, tmp_path: Path) -> None:
    name, data, append, words = BAD[case]
    source = onboarding_dir(tmp_path / "from")
    _break(source, name, data, append)
    config = tmp_path / "etc" / "vmagent"
    hosts = tmp_path / "hosts"
    hosts.write_bytes(HOSTS)
    before = snapshot(tmp_path / "etc", hosts)
    done = onboard("--from", str(source), "--config-dir", str(config), "--hosts-file", str(hosts))
    assert done.returncode == 2, (done.stdout, done.stderr)
    for word in words:
        if word.startswith("re:"):
            assert re.search(word[3:], done.stderr), (word, done.stderr)
        else:
            assert word in done.stderr, (word, done.stderr)
    assert f"{source}/{name}" in done.stderr
    assert done.stderr.endswith("vmagent onboard: nothing was changed\n")
    assert snapshot(tmp_path / "etc", hosts) == before
    assert not config.exists()


def test_onboard_reports_every_bad_file_at_once(tmp_path: Path) -> None:
    source = onboarding_dir(tmp_path / "from")
    (source / "mesh.yaml").unlink()
    (source / "root-cert.pem").write_bytes(b"x")
    done = onboard("--from", str(source), "--config-dir", str(tmp_path / "c"), "--no-hosts")
    assert done.returncode == 2
    assert "mesh.yaml: missing" in done.stderr and "root-cert.pem: not PEM" in done.stderr


def test_onboard_installed_file_left_alone_on_bad_input(tmp_path: Path) -> None:
    source = onboarding_dir(tmp_path / "from")
    config = tmp_path / "c"
    assert onboard("--from", str(source), "--config-dir", str(config), "--no-hosts").returncode == 0
    before = snapshot(config)
    (source / "cluster.env").write_bytes(b"POD_NAMESPACE='Not_A_Namespace'\n")
    (source / "root-cert.pem").write_bytes(make_cert())  # would be replaced if input were good
    done = onboard("--from", str(source), "--config-dir", str(config), "--no-hosts")
    assert done.returncode == 2 and "cluster.env:1: POD_NAMESPACE" in done.stderr
    assert snapshot(config) == before


def test_onboard_near_expiry_token_warns_and_opaque_token_notes(tmp_path: Path) -> None:
    source = onboarding_dir(tmp_path / "from")
    (source / "istio-token").write_bytes(make_token(lifetime=300))
    args = ["--from", str(source), "--config-dir", str(tmp_path / "c"), "--no-hosts"]
    near = onboard(*args)
    assert near.returncode == 0, near.stderr
    assert "warning:" in near.stderr and "the token expires in 4 min" in near.stderr
    (source / "istio-token").write_bytes(b"an-opaque-bearer-token\n")
    opaque = onboard(*args)
    assert opaque.returncode == 0, opaque.stderr
    assert "not a JWT (opaque token): installed as it is" in opaque.stdout
    assert "replaced" in opaque.stdout


def test_onboard_broken_marker_in_hosts_is_refused(tmp_path: Path) -> None:
    source = onboarding_dir(tmp_path / "from")
    hosts = tmp_path / "hosts"
    hosts.write_bytes(HOSTS + b"# BEGIN vmagent onboard (x)\n10.0.0.1 a\n")
    args = ["--from", str(source), "--config-dir", str(tmp_path / "c"), "--hosts-file", str(hosts)]
    done = onboard(*args)
    assert done.returncode == 2
    assert f"{hosts}:2: '# BEGIN vmagent onboard' without '# END vmagent onboard'" in done.stderr
    assert not (tmp_path / "c").exists()
    removed = onboard("--remove-hosts", "--hosts-file", str(hosts))
    assert removed.returncode == 2 and "fix the file by hand" in removed.stderr


def test_onboard_usage_errors(tmp_path: Path) -> None:
    no_from = onboard("--config-dir", str(tmp_path / "c"))
    assert no_from.returncode == 2 and "--from DIR is required" in no_from.stderr
    no_dir = onboard("--from", str(tmp_path / "nowhere"), "--config-dir", str(tmp_path / "c"))
    assert no_dir.returncode == 2 and "no such directory" in no_dir.stderr
    for refused in (no_from, no_dir):  # every refusal ends saying so
        assert refused.stderr.endswith("vmagent onboard: nothing was changed\n")
    source = onboarding_dir(tmp_path / "from")
    bad_group = onboard(
        "--from", str(source), "--config-dir", str(tmp_path / "c"), "--no-hosts",
        "--group", "no-such-group-here",
    )
    if bad_group.returncode == 0:
        pytest.skip("not root: --group is not used")
    assert bad_group.returncode == 2 and "--group no-such-group-here: no such group" in (
        bad_group.stderr
    )
    assert not (tmp_path / "c").exists()
