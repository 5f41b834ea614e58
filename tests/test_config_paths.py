"""Where settings and onboarding files come from: ``VMAGENT_CONFIG_DIR`` locates every
onboarding file, ``VMAGENT_STATE_DIR`` holds the certificates, Istio's own VM paths are read
when vmagent's are absent, explicit settings win over both; ``CA_ADDR`` falls back to the mesh
config's ``discoveryAddress`` (reference §0, §1.2).

Istio's paths are looked up under a filesystem ``root`` the tests lay out in a temporary
directory (``load_config(..., root=...)``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmagent.config import Config, ConfigError, describe, load_config
from vmagent.config_paths import CONFIG_DIR, ISTIO

ROOT_PEM = "-----BEGIN CERTIFICATE-----\nnot parsed here\n-----END CERTIFICATE-----\n"


def onboarding_dir(directory: Path, namespace: str, discovery: str) -> Path:
    """What ``istioctl x workload entry configure -o DIR`` leaves, laid out under ``directory``
    with vmagent's names."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster.env").write_text(f"POD_NAMESPACE='{namespace}'\nSERVICE_ACCOUNT='sa'\n")
    (directory / "mesh.yaml").write_text(f"defaultConfig:\n  discoveryAddress: {discovery}\n")
    (directory / "root-cert.pem").write_text(ROOT_PEM)
    (directory / "istio-token").write_text("token\n")
    return directory


def istio_layout(root: Path, namespace: str, discovery: str) -> Path:
    """The same files where Istio's VM documentation puts them (reference §7.1)."""
    for path, text in {
        "var/lib/istio/envoy/cluster.env": f"POD_NAMESPACE='{namespace}'\n",
        "etc/istio/config/mesh": f"defaultConfig:\n  discoveryAddress: {discovery}\n",
        "etc/certs/root-cert.pem": ROOT_PEM,
        "var/run/secrets/tokens/istio-token": "token\n",
    }.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def files(config: Config) -> dict[str, tuple[str, str]]:
    return {f.role: (f.path, f.how) for f in config.files}


def test_certificates_follow_the_state_directory(tmp_path: Path) -> None:
    env = {"VMAGENT_STATE_DIR": str(tmp_path / "state"), "VMAGENT_CONFIG_DIR": str(tmp_path)}
    config = load_config(env, root=tmp_path)
    assert config.output_certs == str(tmp_path / "state" / "certs")
    assert config.sources["OUTPUT_CERTS"] == "default: <VMAGENT_STATE_DIR>/certs"
    explicit = load_config({**env, "OUTPUT_CERTS": str(tmp_path / "elsewhere")}, root=tmp_path)
    assert explicit.output_certs == str(tmp_path / "elsewhere")


def test_the_config_directory_locates_every_onboarding_file(tmp_path: Path) -> None:
    etc = onboarding_dir(tmp_path / "moved", "from-dir", "istiod-dir.istio-system.svc:15012")
    config = load_config({"VMAGENT_CONFIG_DIR": str(etc)}, root=tmp_path / "empty-root")
    assert config.namespace == "from-dir"  # cluster.env read from the directory
    assert config.sources["POD_NAMESPACE"] == f"file:{etc / 'cluster.env'}"
    assert config.proxy_config.discovery_address == "istiod-dir.istio-system.svc:15012"
    assert config.vmagent_token_file == str(etc / "istio-token")
    assert config.xds_root_ca == str(etc / "root-cert.pem")
    assert {how for _, how in files(config).values()} == {CONFIG_DIR}


def test_istio_vm_paths_are_read_when_vmagents_are_absent(tmp_path: Path) -> None:
    root = istio_layout(tmp_path / "root", "from-istio", "istiod-istio.istio-system.svc:15012")
    empty = tmp_path / "etc-vmagent"
    empty.mkdir()
    config = load_config({"VMAGENT_CONFIG_DIR": str(empty)}, root=root)
    assert config.namespace == "from-istio"
    assert config.ca_addr == "istiod-istio.istio-system.svc:15012"
    assert config.vmagent_token_file == str(root / "var/run/secrets/tokens/istio-token")
    assert config.xds_root_ca == str(root / "etc/certs/root-cert.pem")
    found = files(config)
    assert found["cluster.env"] == (str(root / "var/lib/istio/envoy/cluster.env"), ISTIO)
    assert found["mesh config"] == (str(root / "etc/istio/config/mesh"), ISTIO)


def test_vmagents_directory_wins_over_istios_paths(tmp_path: Path) -> None:
    root = istio_layout(tmp_path / "root", "from-istio", "istiod-istio.istio-system.svc:15012")
    etc = onboarding_dir(tmp_path / "etc", "from-dir", "istiod-dir.istio-system.svc:15012")
    config = load_config({"VMAGENT_CONFIG_DIR": str(etc)}, root=root)
    assert config.namespace == "from-dir" and config.ca_addr.startswith("istiod-dir.")
    assert all(path.startswith(str(etc)) for path, _ in files(config).values())


def test_explicit_settings_win_over_both(tmp_path: Path) -> None:
    root = istio_layout(tmp_path / "root", "from-istio", "istiod-istio.istio-system.svc:15012")
    etc = onboarding_dir(tmp_path / "etc", "from-dir", "istiod-dir.istio-system.svc:15012")
    mine = onboarding_dir(tmp_path / "mine", "explicit", "istiod-mine.istio-system.svc:15012")
    config = load_config(
        {
            "VMAGENT_CONFIG_DIR": str(etc),
            "VMAGENT_CLUSTER_ENV": str(mine / "cluster.env"),
            "VMAGENT_MESH_CONFIG": str(mine / "mesh.yaml"),
            "XDS_ROOT_CA": str(mine / "root-cert.pem"),
            "VMAGENT_TOKEN_FILE": str(mine / "istio-token"),
        },
        root=root,
    )
    assert config.namespace == "explicit" and config.ca_addr.startswith("istiod-mine.")
    assert config.xds_root_ca == str(mine / "root-cert.pem")
    assert config.vmagent_token_file == str(mine / "istio-token")
    assert all(how.startswith("explicit: ") for _, how in files(config).values())


def test_ca_addr_falls_back_to_the_mesh_configs_discovery_address(tmp_path: Path) -> None:
    etc = onboarding_dir(tmp_path / "etc", "ns", "istiod-rev-2.istio-system.svc:15012")
    (etc / "cluster.env").write_text("POD_NAMESPACE='ns'\n")  # istioctl wrote no CA_ADDR
    config = load_config({"VMAGENT_CONFIG_DIR": str(etc)}, root=tmp_path)
    assert config.ca_address == "istiod-rev-2.istio-system.svc:15012"
    shown = {key: (value, source) for key, value, source in describe(config)}
    assert shown["CA_ADDR"] == (
        "istiod-rev-2.istio-system.svc:15012",
        f"mesh:{etc / 'mesh.yaml'} discoveryAddress",
    )
    # PROXY_CONFIG is laid over mesh.yaml (pilot-agent's order), and CA_ADDR follows it.
    overlay = load_config(
        {"VMAGENT_CONFIG_DIR": str(etc), "PROXY_CONFIG": "discoveryAddress: pc.example:15012"},
        root=tmp_path,
    )
    assert overlay.ca_address == "pc.example:15012"
    assert overlay.sources["CA_ADDR"] == "env PROXY_CONFIG discoveryAddress"
    # An explicit CA_ADDR (env, or cluster.env as istioctl writes for revisions) wins.
    (etc / "cluster.env").write_text("CA_ADDR='istiod-ca.istio-system.svc:15012'\n")
    explicit = load_config({"VMAGENT_CONFIG_DIR": str(etc)}, root=tmp_path)
    assert explicit.ca_address == "istiod-ca.istio-system.svc:15012"
    assert explicit.proxy_config.discovery_address == "istiod-rev-2.istio-system.svc:15012"


def test_without_any_mesh_config_both_use_istios_default(tmp_path: Path) -> None:
    config = load_config({"VMAGENT_CONFIG_DIR": str(tmp_path)}, root=tmp_path)
    assert config.ca_address == "istiod.istio-system.svc:15012"
    assert config.sources["CA_ADDR"] == "default discoveryAddress"


def test_a_discovery_address_with_a_bad_port_names_the_file(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:150120\n")
    with pytest.raises(ConfigError) as info:
        load_config({"VMAGENT_MESH_CONFIG": str(mesh), "VMAGENT_CONFIG_DIR": str(tmp_path)})
    message = str(info.value)
    assert f"{mesh}: defaultConfig: discoveryAddress: bad port" in message, message
    assert "between 1 and 65535" in message, message
