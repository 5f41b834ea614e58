"""cluster.env's capture keys (istioctl writes them; they used to be silently ignored) become
the rule set; bad values are refused at load naming the key, the file and what is allowed."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from vmagent.capture.rules import build
from vmagent.capture.shell import PROXY_USERS, proxy_ids, spec_of, wanted
from vmagent.config import ConfigError, load_config

NO_MESH = {"VMAGENT_MESH_CONFIG": "/dev/null"}


def _config(tmp_path: Path, text: str, **env: str):  # type: ignore[no-untyped-def]
    cluster_env = tmp_path / "cluster.env"
    cluster_env.write_text(text)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\nnameserver fd00::53\n")
    environ = {**NO_MESH, "VMAGENT_RESOLV_CONF": str(resolv), **env}
    return load_config(environ, cluster_env=cluster_env)


def test_capture_keys_from_cluster_env_make_the_rules(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        "ISTIO_META_DNS_CAPTURE='true'\nISTIO_SERVICE_CIDR='10.96.0.0/12,fd00:10::/64'\n"
        "ISTIO_INBOUND_PORTS='*'\nISTIO_LOCAL_EXCLUDE_PORTS='22,15090,15021,15020'\n"
        "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE='5432'\nISTIO_SERVICE_EXCLUDE_CIDR='10.96.5.0/24'\n"
        "PROXY_UID='998'\n",
    )
    assert wanted(config)
    spec = spec_of(config)
    assert spec.nameservers == ("127.0.0.53", "fd00::53")
    assert (spec.proxy_uids, spec.proxy_gids) == (("998",), ("998",))  # GID = UID, as Istio
    v4 = [" ".join(w) for t, c, w in build(spec, 4).rules if t == "nat"]
    assert "-d 10.96.0.0/12 -j VMAGENT_REDIRECT" in v4
    assert "-p udp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-ports 15053" in v4
    assert "-p tcp --dport 22 -j RETURN" in v4
    assert "-d 10.96.5.0/24 -j RETURN" in v4
    v6 = [" ".join(w) for t, c, w in build(spec, 6).rules if t == "nat"]
    assert "-d fd00:10::/64 -j VMAGENT_REDIRECT" in v6
    assert "-p tcp --dport 53 -d fd00::53/128 -j REDIRECT --to-ports 15053" in v6


def test_nothing_asked_for_by_default(tmp_path: Path) -> None:
    config = _config(tmp_path, "")
    assert not wanted(config)
    assert not spec_of(config).dns_active()


def test_proxy_ids_default(tmp_path: Path) -> None:
    """Without PROXY_UID: users vmagent, vmagent-envoy, istio-proxy as present, else 1337."""
    known = [u for u in PROXY_USERS if u in {p.pw_name for p in pwd.getpwall()}]
    uids, gids = proxy_ids(_config(tmp_path, ""))
    if known:
        assert uids == tuple(dict.fromkeys(str(pwd.getpwnam(u).pw_uid) for u in known))
        assert gids == tuple(dict.fromkeys(str(pwd.getpwnam(u).pw_gid) for u in known))
    else:
        assert (uids, gids) == (("1337",), ("1337",))
    assert proxy_ids(_config(tmp_path, "PROXY_UID=1337,1338\nPROXY_GID=7\n")) == (
        ("1337", "1338"),
        ("7",),
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "ISTIO_SERVICE_CIDR='10.96.0.0/99'",
            "'10.96.0.0/99': expected IP ranges such as 10.96.0.0/12 or \"*\"",
        ),
        ("ISTIO_SERVICE_EXCLUDE_CIDR='*'", "'*': expected IP ranges such as 10.96.0.0/12"),
        ("ISTIO_SERVICE_CIDR='*,10.0.0.0/8'", '"*" (everything) cannot be combined with ranges'),
        ("ISTIO_INBOUND_PORTS='*,80'", '"*" (every port) cannot be combined with ports'),
        ("ISTIO_INBOUND_PORTS='80,http'", "'http': expected ports 1-65535 or \"*\""),
        ("ISTIO_LOCAL_EXCLUDE_PORTS='70000'", "'70000': expected ports 1-65535"),
        (
            "PROXY_UID='istio-proxy'",
            "expected numeric ids such as 1337 or 1337,1338 (for a user: id -u NAME)",
        ),
        ("INBOUND_CAPTURE_PORT='0'", "must be between 1 and 65535"),
    ],
)
def test_bad_capture_values_name_key_and_file(tmp_path: Path, line: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, line + "\n")
    key = line.split("=")[0]
    assert f"{key}=" in str(info.value)
    assert f"(from file:{tmp_path / 'cluster.env'})" in str(info.value)
    assert str(info.value).endswith(expected)
