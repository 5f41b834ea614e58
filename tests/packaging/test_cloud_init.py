"""cloud-init bootstrap (packaging/cloud-init/): the templates, filled by render.py, pass
``cloud-init schema -c`` (and a broken copy does not), and run for real: a NoCloud seed in a
fresh Debian 12 root (cloud-init 22.4, no vmagent installed) booted with systemd-nspawn. The
user-data downloads the .deb over HTTP from the "cloud network", installs it, configures
vmagent, starts it and waits for ``vmagent status --wait``; the test, from outside (nsenter),
waits for cloud-init's ``status: done`` and checks what an operator would: ``vmagent status``
exit 0, the WorkloadEntry in devmesh's registry, /etc/vmagent's owners and modes.

Two paths: Istio's onboarding files (token in user-data, ``vmagent onboard``) and a cloud
identity (GCE: a metadata emulator on 169.254.169.254 on the cloud side, the dev CA verifying
its JWT; no secret in user-data).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from bootroot import (
    CLOUD_IP,
    ISTIOD_NAME,
    VM_IP,
    Machine,
    NetNS,
    Root,
    booted,
    devmesh,
    onboarding_files,
    resolver,
    serve_http,
    stop,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pkgtools import REPO, Built, run

pytestmark = [pytest.mark.timeout(900)]

TEMPLATES = REPO / "packaging" / "cloud-init"
RENDER = TEMPLATES / "render.py"
ISTIOCTL_FIXTURE = REPO / "tests" / "fixtures" / "istio-onboarding" / "ipv4"
HOSTS_LINE = f"{CLOUD_IP} {ISTIOD_NAME}"  # istioctl's hosts file (bootroot.onboarding_files)
METADATA_IP = "169.254.169.254"
CONFIG_FILES = ["/etc/vmagent/cluster.env", "/etc/vmagent/mesh.yaml", "/etc/vmagent/root-cert.pem"]


def render(
    template: str, source: Path | None = None, **values: str
) -> subprocess.CompletedProcess[str]:
    """render.py as a user runs it: ``--from source`` and ``--set NAME=VALUE`` each."""
    args: list[str | Path] = [sys.executable, RENDER, TEMPLATES / template]
    if source is not None:
        args += ["--from", source]
    for name, value in values.items():
        args += ["--set", f"{name}={value}"]
    return run(*args, check=False)


def schema(path: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("cloud-init") is None:
        pytest.skip("cloud-init missing (apt-get install cloud-init; scripts/setup --test)")
    return run("cloud-init", "schema", "-c", path, check=False)


def self_signed_root() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def istioctl_dir(tmp_path: Path) -> Path:
    """istioctl's real output (the fixture's cluster.env, mesh.yaml, hosts) plus a root cert
    and a token, as the cluster would give them."""
    out = tmp_path / "vm-files"
    shutil.copytree(ISTIOCTL_FIXTURE, out)
    (out / "root-cert.pem").write_text(self_signed_root())
    (out / "istio-token").write_text("eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOlsiaXN0aW8tY2EiXX0.c2ln\n")
    return out


PACKAGE = {
    "VMAGENT_PACKAGE_URL": "https://downloads.example.com/vmagent_0.1.0-1_amd64.deb",
    "VMAGENT_PACKAGE_SHA256": "0" * 64,
}
FILLED = {
    "istio-files.yaml": PACKAGE,
    "cloud-identity.yaml": {**PACKAGE, "CREDENTIAL_FETCHER_TYPE": "GoogleComputeEngine"},
}


@pytest.mark.parametrize("template", sorted(FILLED))
def test_filled_template_passes_cloud_init_schema(
    template: str, istioctl_dir: Path, tmp_path: Path
) -> None:
    rendered = render(template, istioctl_dir, **FILLED[template])
    assert rendered.returncode == 0, rendered.stderr
    user_data = tmp_path / "user-data"
    user_data.write_text(rendered.stdout)
    checked = schema(user_data)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Valid cloud-config" in checked.stdout
    # Every file arrives as its text (the block scalars' indentation is right).
    config = yaml.safe_load(rendered.stdout)
    written = {Path(f["path"]).name: f["content"] for f in config["write_files"]}
    for name in ("cluster.env", "mesh.yaml", "root-cert.pem"):
        expected = (istioctl_dir / name).read_text().rstrip("\n") + "\n"
        assert written[name].startswith(expected), name
    if template == "istio-files.yaml":
        assert written["istio-token"] == (istioctl_dir / "istio-token").read_text()
    else:  # no secret at all
        assert "istio-token" not in written and "eyJ" not in rendered.stdout
        assert written["cluster.env"].endswith("CREDENTIAL_FETCHER_TYPE=GoogleComputeEngine\n")
    assert f"url='{PACKAGE['VMAGENT_PACKAGE_URL']}'" in config["runcmd"][0]


@pytest.mark.parametrize(
    "breakage",
    [
        # permissions as a YAML number (0640 is octal 416), not the string cloud-init wants
        ('permissions: "0600"', "permissions: 0600"),
        # a typo in a write_files key
        ("owner: root:root", "ownr: root:root"),
    ],
)
def test_schema_check_fails_on_a_broken_copy(
    breakage: tuple[str, str], istioctl_dir: Path, tmp_path: Path
) -> None:
    rendered = render("istio-files.yaml", istioctl_dir, **PACKAGE).stdout
    assert breakage[0] in rendered
    broken = tmp_path / "broken"
    broken.write_text(rendered.replace(breakage[0], breakage[1], 1))
    checked = schema(broken)
    assert checked.returncode != 0, checked.stdout
    assert "write_files.0" in checked.stderr, checked.stderr


def test_a_file_pasted_without_indentation_fails_the_check(
    istioctl_dir: Path, tmp_path: Path
) -> None:
    """What render.py prevents: a PEM pasted at column 0 ends the block scalar."""
    template = (TEMPLATES / "istio-files.yaml").read_text()
    pem = (istioctl_dir / "root-cert.pem").read_text()
    pasted = template.replace("      @ROOT_CERT_PEM@\n", pem)
    (tmp_path / "t.yaml").write_text(pasted)
    checked = schema(tmp_path / "t.yaml")
    assert checked.returncode != 0, checked.stdout
    assert "is not valid yaml" in checked.stderr, checked.stderr


def test_render_names_what_is_missing_or_unknown(istioctl_dir: Path) -> None:
    missing = render("cloud-identity.yaml", istioctl_dir, VMAGENT_PACKAGE_URL="x")
    assert missing.returncode == 2 and missing.stdout == ""
    assert "@CREDENTIAL_FETCHER_TYPE@" in missing.stderr
    assert "@VMAGENT_PACKAGE_SHA256@" in missing.stderr
    unknown = render("istio-files.yaml", istioctl_dir, **PACKAGE, CREDENTIAL_FETCHER_TYPE="AWS")
    assert unknown.returncode == 2 and "no placeholder @CREDENTIAL_FETCHER_TYPE@" in unknown.stderr
    inline = render("istio-files.yaml", istioctl_dir, **(PACKAGE | {"VMAGENT_PACKAGE_URL": "a\nb"}))
    assert inline.returncode == 2 and "several lines" in inline.stderr
    (istioctl_dir / "istio-token").unlink()
    absent = render("istio-files.yaml", istioctl_dir, **PACKAGE)
    assert absent.returncode == 2 and "istio-token" in absent.stderr


def render_args(template: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """render.py with raw arguments (``--file``, ``--set`` exactly as typed)."""
    return run(sys.executable, RENDER, TEMPLATES / template, *args, check=False)


def write_files(user_data: str) -> dict[str, str]:
    config = yaml.safe_load(user_data)
    return {Path(f["path"]).name: f["content"] for f in config["write_files"]}


@pytest.mark.parametrize(
    "pem_prefix",
    ["  ", "\n  ", "\n\n    "],
    ids=["indented", "blank-then-indented", "blanks-then-deeper"],
)
@pytest.mark.parametrize("template", sorted(FILLED))
def test_a_file_whose_first_line_is_indented_arrives_intact(
    template: str, pem_prefix: str, istioctl_dir: Path, tmp_path: Path
) -> None:
    """A PEM pasted with leading spaces (or after a blank line) used to end the block scalar
    early: broken user-data, exit 0. Now the header carries the indentation indicator."""
    pem = (istioctl_dir / "root-cert.pem").read_text()
    indented = pem_prefix + pem.replace("\n", "\n  ").rstrip(" ") + "\n\n"
    (istioctl_dir / "root-cert.pem").write_text(indented)
    rendered = render(template, istioctl_dir, **FILLED[template])
    assert rendered.returncode == 0, rendered.stderr
    # Trailing blank lines dropped, one final newline; everything else as it was.
    assert write_files(rendered.stdout)["root-cert.pem"] == indented.rstrip("\n") + "\n"
    (tmp_path / "user-data").write_text(rendered.stdout)
    checked = schema(tmp_path / "user-data")
    assert checked.returncode == 0 and "Valid cloud-config" in checked.stdout, checked.stderr


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("token\x85\n", "does not survive YAML"),  # NEL: a YAML 1.1 line break, dropped
        ("tok\x85  en\n", "does not survive YAML"),  # ... or turned into "\n"
        ("tok\x85en\n", "not valid in YAML"),
        ("tok\x07en\n", "not valid in YAML"),  # a control character YAML does not allow
    ],
    ids=["NEL-end", "NEL-indented", "NEL", "control-char"],
)
def test_render_parses_its_output_and_names_a_file_yaml_mangles(
    text: str, why: str, istioctl_dir: Path
) -> None:
    (istioctl_dir / "istio-token").write_text(text)
    rendered = render("istio-files.yaml", istioctl_dir, **PACKAGE)
    assert rendered.returncode == 2 and rendered.stdout == "", rendered.stdout
    assert why in rendered.stderr and "@ISTIO_TOKEN@" in rendered.stderr, rendered.stderr


@pytest.mark.parametrize("via", ["--from", "--file"])
def test_a_non_utf8_file_is_refused_by_name(via: str, istioctl_dir: Path) -> None:
    pem = istioctl_dir / "root-cert.pem"
    pem.write_bytes(b"\xff\xfe-----BEGIN CERTIFICATE-----\n")
    if via == "--from":
        rendered = render("istio-files.yaml", istioctl_dir, **PACKAGE)
    else:
        sets = [f"--set={k}={v}" for k, v in PACKAGE.items()]
        others = [f"--file={k}={istioctl_dir / f}" for k, f in
                  [("CLUSTER_ENV", "cluster.env"), ("MESH_YAML", "mesh.yaml"),
                   ("ISTIO_TOKEN", "istio-token"), ("HOSTS", "hosts")]]  # fmt: skip
        rendered = render_args("istio-files.yaml", *sets, *others, f"--file=ROOT_CERT_PEM={pem}")
    assert rendered.returncode == 2 and "Traceback" not in rendered.stderr, rendered.stderr
    assert "root-cert.pem: not UTF-8 text" in rendered.stderr, rendered.stderr
    assert "@ROOT_CERT_PEM@" in rendered.stderr, rendered.stderr


@pytest.mark.parametrize(
    ("template", "argument", "expected"),
    [
        ("istio-files.yaml", "VMAGENT_PACKAGE_SHA256", "give --set NAME=VALUE"),
        ("istio-files.yaml", "VMAGENT_PACKAGE_URL=", "@VMAGENT_PACKAGE_URL@: empty"),
        ("istio-files.yaml", "VMAGENT_PACKAGE_URL=ftp://h/a.deb", "https://, http:// or file://"),
        ("istio-files.yaml", "VMAGENT_PACKAGE_URL=https://h/a b.deb", "without spaces"),
        ("istio-files.yaml", "VMAGENT_PACKAGE_URL=https://h/a.deb'; touch /tmp/pwned; '", "quotes"),
        ("istio-files.yaml", "VMAGENT_PACKAGE_SHA256=", "@VMAGENT_PACKAGE_SHA256@: empty"),
        ("istio-files.yaml", "VMAGENT_PACKAGE_SHA256=nothex", "64 hex digits"),
        ("istio-files.yaml", "VMAGENT_PACKAGE_SHA256=" + "0" * 63, "64 hex digits"),
        ("cloud-identity.yaml", "CREDENTIAL_FETCHER_TYPE=gce", "GoogleComputeEngine, AWS, Azure"),
        ("cloud-identity.yaml", "CREDENTIAL_FETCHER_TYPE=JWT", "JWT needs istio-token"),
        ("cloud-identity.yaml", "CREDENTIAL_FETCHER_TYPE=", "@CREDENTIAL_FETCHER_TYPE@: empty"),
    ],
)
def test_each_value_is_checked_and_a_bad_one_named(
    template: str, argument: str, expected: str, istioctl_dir: Path
) -> None:
    values = {k: v for k, v in FILLED[template].items() if k != argument.partition("=")[0]}
    rendered = render_args(
        template, "--from", istioctl_dir, *(f"--set={k}={v}" for k, v in values.items()),
        f"--set={argument}",
    )  # fmt: skip
    assert rendered.returncode == 2 and rendered.stdout == "", rendered.stderr
    assert expected in rendered.stderr, rendered.stderr
    assert f"@{argument.partition('=')[0]}@" in rendered.stderr or "=" not in argument


def test_accepted_values_are_normalised(istioctl_dir: Path) -> None:
    rendered = render(
        "cloud-identity.yaml", istioctl_dir, CREDENTIAL_FETCHER_TYPE="aws",
        VMAGENT_PACKAGE_URL="file:///srv/vmagent.rpm", VMAGENT_PACKAGE_SHA256="AB" * 32,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    assert write_files(rendered.stdout)["cluster.env"].endswith("CREDENTIAL_FETCHER_TYPE=AWS\n")
    assert f"sha256='{'ab' * 32}'" in rendered.stdout
    unchecked = PACKAGE | {"VMAGENT_PACKAGE_SHA256": "unchecked"}
    skipped = render("istio-files.yaml", istioctl_dir, **unchecked)
    assert skipped.returncode == 0 and "sha256=''\n" in skipped.stdout, skipped.stderr


def runcmd_script(user_data: str, workdir: Path, stage: str) -> Path:
    """The rendered runcmd script, its /var/tmp and staging paths moved into ``workdir``."""
    script = yaml.safe_load(user_data)["runcmd"][0]
    assert script.count(stage) == 1 and script.count("/var/tmp/") == 2, script
    path = workdir / "runcmd"
    path.write_text(
        script.replace(stage, str(workdir / "stage")).replace("/var/tmp/", f"{workdir}/")
    )
    return path


STUB = '#!/bin/sh\necho "$(basename "$0") $*" >> "$STUB_LOG"\n'
STUB_ONBOARD = STUB + '[ "$1 ${FAIL_ONBOARD:-}" != "onboard 1" ]\n'


def stubbed_path(workdir: Path) -> dict[str, str]:
    """PATH with logging stand-ins for the system-changing commands (apt-get, systemctl,
    vmagent); curl, sha256sum and sh stay real (the URL is a file:// one: no network)."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    for name, text in (("apt-get", STUB), ("systemctl", STUB), ("vmagent", STUB_ONBOARD)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(workdir / "calls")}


@pytest.mark.parametrize("template", sorted(FILLED))
def test_a_hostile_url_renders_inert(template: str, istioctl_dir: Path, tmp_path: Path) -> None:
    """A URL without quotes or spaces but with $( ), ${IFS} and ; passes the check: it must
    reach curl as one word, running nothing (no network: a file:// URL of a file so named)."""
    if shutil.which("curl") is None:
        pytest.skip("curl missing")
    work = tmp_path / "work"
    work.mkdir()
    hostile = work / "pkg$(touch${IFS}pwned);touch${IFS}pwned2;{a,b}[1-2]"
    hostile.write_bytes(b"not the package")
    values = FILLED[template] | {"VMAGENT_PACKAGE_URL": f"file://{hostile}"}
    rendered = render(template, istioctl_dir, **values)
    assert rendered.returncode == 0, rendered.stderr
    stage = {"istio-files.yaml": "/var/lib/vmagent-onboarding"}.get(
        template, "/var/lib/vmagent-config"
    )
    script = runcmd_script(rendered.stdout, work, stage)
    assert run("sh", "-n", script).returncode == 0
    ran = run("sh", script, cwd=work, env=stubbed_path(work), check=False)
    # curl fetched that very file (one word, no globbing); its SHA-256 is not 0*64: refused,
    # the download removed; nothing else ran.
    assert ran.returncode == 1 and "SHA-256 mismatch" in ran.stderr, ran.stdout + ran.stderr
    assert sorted(p.name for p in work.iterdir()) == sorted([hostile.name, "runcmd", "bin"])
    assert not (work / "calls").exists()


def test_the_script_can_be_rerun_after_a_failure(istioctl_dir: Path, tmp_path: Path) -> None:
    """runcmd runs once per instance; the operator re-runs it. Staged files stay until
    installed; a run after that skips the step (it used to fail: the staging dir was gone)."""
    work = tmp_path / "work"
    work.mkdir()
    package = work / "vmagent.pkg"
    package.write_bytes(b"package bytes")
    digest = hashlib.sha256(package.read_bytes()).hexdigest()
    rendered = render(
        "istio-files.yaml", istioctl_dir, VMAGENT_PACKAGE_URL=f"file://{package}",
        VMAGENT_PACKAGE_SHA256=digest,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    script = runcmd_script(rendered.stdout, work, "/var/lib/vmagent-onboarding")
    (work / "stage").mkdir()
    (work / "stage" / "istio-token").write_text("tok\n")
    env = stubbed_path(work)
    first = run("sh", script, env=env | {"FAIL_ONBOARD": "1"}, check=False)
    assert first.returncode != 0 and (work / "stage" / "istio-token").exists()
    for attempt in (2, 3):  # the retry, then once more: both succeed
        again = run("sh", script, env=env, check=False)
        assert again.returncode == 0, (attempt, again.stdout + again.stderr)
        assert not (work / "stage").exists()
    calls = (work / "calls").read_text().splitlines()
    assert [c.split()[1] for c in calls if c.startswith("vmagent")] == [
        "onboard", "onboard", "status", "status"
    ]  # fmt: skip
    assert calls.count("systemctl enable --now --no-block vmagent") == 2


def test_size_warns_above_ec2_and_refuses_above_gce(istioctl_dir: Path) -> None:
    normal = render("istio-files.yaml", istioctl_dir, **PACKAGE)
    assert normal.returncode == 0 and normal.stderr == "", normal.stderr
    # The template's leading comment block is left out (--keep-comments keeps it).
    assert len(normal.stdout) < 6000 and "What happens" not in normal.stdout
    kept = render_args(
        "istio-files.yaml", "--keep-comments", "--from", istioctl_dir,
        *(f"--set={k}={v}" for k, v in PACKAGE.items()),
    )  # fmt: skip
    assert kept.returncode == 0 and "What happens" in kept.stdout
    mesh = istioctl_dir / "mesh.yaml"
    text = mesh.read_text()
    mesh.write_text(text + "# padding\n" * 1700)  # ~17 KB
    big = render("istio-files.yaml", istioctl_dir, **PACKAGE)
    assert big.returncode == 0 and "above EC2's 16384" in big.stderr, big.stderr
    mesh.write_text(text + "# padding\n" * 27000)  # ~270 KB
    huge = render("istio-files.yaml", istioctl_dir, **PACKAGE)
    assert huge.returncode == 2 and huge.stdout == "" and "above 262144" in huge.stderr


@pytest.mark.parametrize("template", sorted(FILLED))
def test_manage_etc_hosts_is_off_explicitly(template: str, istioctl_dir: Path) -> None:
    rendered = render(template, istioctl_dir, **FILLED[template])
    assert yaml.safe_load(rendered.stdout)["manage_etc_hosts"] is False


def test_docs_name_every_copy_of_the_token_and_the_retry() -> None:
    doc = (REPO / "docs" / "cloud-init.md").read_text()
    for place in ("user-data.txt", "user-data.txt.i", "cloud-config.txt", "obj.pkl"):
        assert f"/var/lib/cloud/instance/{place}" in doc or f"`{place}`" in doc, place
    assert "/var/lib/cloud/instance/scripts/runcmd" in doc
    assert "byte for byte" not in doc


# ---------------------------------------------------------------------------------------------
# Real NoCloud boots


@pytest.fixture
def package_url(netns: NetNS, built: Built, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(URL, sha256) of the .deb, served over HTTP on the namespace's cloud network."""
    public = tmp_path / "downloads"
    public.mkdir()
    shutil.copyfile(built.deb, public / built.deb.name)
    digest = hashlib.sha256(built.deb.read_bytes()).hexdigest()
    with serve_http(netns, public, tmp_path) as base:
        yield f"{base}/{built.deb.name}", digest


def seed(root: Root, user_data: str) -> None:
    """A NoCloud seed and cloud-init switched on (Root() disables it)."""
    root.file("/etc/cloud/cloud-init.disabled").unlink()
    root.write(
        "/etc/cloud/cloud.cfg.d/99-vmagent-test.cfg",
        "datasource_list: [ NoCloud, None ]\n"
        # The namespace's eth0 is configured already (bootroot.NetNS): no fallback DHCP.
        "network: {config: disabled}\n"
        # The minimal root has no en_US.UTF-8 locale data (cloud images do): cc_locale would
        # fail and mark the whole run `error`, for reasons that are not vmagent's.
        "locale: false\n",
    )
    root.write("/var/lib/cloud/seed/nocloud/meta-data", "instance-id: vm-1\nlocal-hostname: vm-1\n")
    root.write("/var/lib/cloud/seed/nocloud/user-data", user_data, 0o600)


def cloud_init_finished(machine: Machine, seconds: float = 600) -> tuple[str, float]:
    """Wait for cloud-init's final stage to end: (``cloud-init status`` line, the seconds it
    took from systemd up)."""
    started = time.monotonic()
    # result.json is written when the final stage ends; `cloud-init status` says "error" as
    # soon as an earlier stage had one, while the final stage still runs.
    machine.wait_for(
        lambda: machine.sh("test -e /run/cloud-init/result.json").returncode == 0,
        seconds,
        "cloud-init's final stage to end (/run/cloud-init/result.json)",
    )
    return machine.sh("cloud-init status").stdout.strip(), time.monotonic() - started


def cloud_init_done(machine: Machine) -> float:
    """The seconds cloud-init took; fails with its own account unless ``status: done``."""
    state, took = cloud_init_finished(machine)
    if state != "status: done":
        long = machine.sh("cloud-init status --long").stdout
        output = machine.sh("tail -n 60 /var/log/cloud-init-output.log").stdout
        journal = machine.sh("journalctl -u vmagent --no-pager -n 40").stdout
        raise AssertionError(f"{state}\n{long}\n--- cloud-init-output.log\n{output}\n{journal}")
    return took


def check_vmagent_healthy(machine: Machine) -> dict[str, object]:
    """What an operator checks after first boot; returns `vmagent status --json`."""
    text = machine.sh("vmagent status")
    assert text.returncode == 0, text.stdout + text.stderr
    view = json.loads(machine.sh("vmagent status --json").stdout)
    assert view["state"] == "healthy", view
    assert view["control_plane"]["workload_entry"] == f"vm-web-{VM_IP}", view
    # devmesh's own registry (its debug port on the cloud side).
    registry = json.loads(machine.sh(f"curl -fsS {CLOUD_IP}:15014/debug/registry").stdout)
    entries = {
        (e["metadata"]["namespace"], e["metadata"]["name"]) for e in registry["workloadEntries"]
    }
    assert ("vm", f"vm-web-{VM_IP}") in entries, registry
    # The package enabled it, the user-data started it once: no failed start, no restart.
    assert machine.sh("systemctl is-enabled vmagent").stdout.strip() == "enabled"
    assert machine.sh("systemctl show -P NRestarts vmagent").stdout.strip() == "0"
    # runcmd's last step printed the healthy status into cloud-init's output log.
    assert "HEALTHY" in machine.sh("cat /var/log/cloud-init-output.log").stdout
    return view  # type: ignore[no-any-return]


def modes(machine: Machine, *paths: str) -> dict[str, str]:
    listing = machine.sh("stat -c '%n %U:%G %a' " + " ".join(paths)).stdout.splitlines()
    return {line.split()[0]: " ".join(line.split()[1:]) for line in listing}


def istioctl_output(keys: Path, directory: Path, **changes: str) -> dict[str, str]:
    """The five files for devmesh's vm/vm-web group (bootroot.onboarding_files: istiod by name
    in mesh.yaml, its address in hosts) written to ``directory``; ``changes`` replace files."""
    files = {**onboarding_files(keys), **changes}
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    return files


def istio_files_user_data(source: Path, package_url: tuple[str, str]) -> str:
    url, digest = package_url
    rendered = render(
        "istio-files.yaml", source, VMAGENT_PACKAGE_URL=url, VMAGENT_PACKAGE_SHA256=digest
    )
    assert rendered.returncode == 0, rendered.stderr
    return rendered.stdout


@pytest.mark.boot
def test_istio_files_user_data_installs_onboards_and_ends_healthy(
    tmp_path: Path, tarball: Path, netns: NetNS, package_url: tuple[str, str]
) -> None:
    with resolver(netns, tmp_path), devmesh(netns, tmp_path) as keys:
        files = istioctl_output(keys, tmp_path / "vm-files")
        root = Root(tmp_path / "root", tarball)
        assert not root.file("/opt/vmagent").exists()
        seed(root, istio_files_user_data(tmp_path / "vm-files", package_url))
        with booted(root, netns, tmp_path / "boot.log", until_booted=False) as machine:
            took = cloud_init_done(machine)
            check_vmagent_healthy(machine)
            assert modes(machine, "/etc/vmagent", *CONFIG_FILES, "/etc/vmagent/istio-token") == {
                "/etc/vmagent": "root:vmagent 750",
                **{path: "root:vmagent 640" for path in CONFIG_FILES},
                "/etc/vmagent/istio-token": "root:vmagent 640",
            }
            assert root.file("/etc/vmagent/istio-token").read_text() == files["istio-token"]
            # onboard's marked block; the staging copies are gone.
            hosts = root.file("/etc/hosts").read_text()
            assert "# BEGIN vmagent onboard" in hosts and HOSTS_LINE in hosts
            assert machine.sh("ls /var/lib/vmagent-onboarding").returncode != 0
            print(f"\ncloud-init (istio files): machine start -> status: done in {took:.1f} s")


@pytest.mark.boot
def test_user_data_ends_in_error_while_vmagent_is_not_healthy(
    tmp_path: Path, tarball: Path, netns: NetNS, package_url: tuple[str, str]
) -> None:
    """cloud-init's status is vmagent's health: istiod's name at a wrong gateway address
    (nothing answers there) ends the run in ``status: error``, the log saying why."""
    with resolver(netns, tmp_path), devmesh(netns, tmp_path) as keys:
        # A gateway address where nothing answers (a stale hosts file).
        istioctl_output(keys, tmp_path / "vm-files", hosts=f"10.77.0.9 {ISTIOD_NAME}\n")
        user_data = istio_files_user_data(tmp_path / "vm-files", package_url)
        # The template waits 300 s; 15 s is enough to show the outcome (the same step).
        assert user_data.count("vmagent status --wait 300\n") == 1
        root = Root(tmp_path / "root", tarball)
        seed(root, user_data.replace("vmagent status --wait 300\n", "vmagent status --wait 15\n"))
        with booted(root, netns, tmp_path / "boot.log", until_booted=False) as machine:
            state, took = cloud_init_finished(machine)
            assert state == "status: error", state
            assert "scripts-user" in machine.sh("cloud-init status --long").stdout
            output = machine.sh("cat /var/log/cloud-init-output.log").stdout
            assert "vmagent status: waiting up to" in output, output[-3000:]
            assert "HEALTHY" not in output, output[-3000:]
            # Installed, onboarded and running: only its health is missing (it keeps trying).
            assert machine.sh("systemctl is-enabled vmagent").stdout.strip() == "enabled"
            assert machine.sh("vmagent status").returncode != 0
            print(f"\ncloud-init (unhealthy vmagent): status: error after {took:.1f} s")


GCE_EMULATOR = """
import http.server, json, sys
sys.path.insert(0, sys.argv[1])
from identity.emulators import CloudKeys, GceEmulator

keys = CloudKeys()
emulator = GceEmulator(keys)  # its request handler, served on the metadata address below
with open(sys.argv[2], "w") as out:
    json.dump(keys.jwks(), out)
server = http.server.ThreadingHTTPServer((sys.argv[3], 80), emulator.server.RequestHandlerClass)
print("GCE metadata emulator listening", flush=True)
server.serve_forever()
"""


@contextmanager
def gce_metadata(netns: NetNS, workdir: Path) -> Iterator[Path]:
    """tests/identity's GCE metadata emulator on 169.254.169.254:80 in ``netns`` (the address
    a GCE VM reaches it at; vmagent's default); yields the JWKS file the dev CA checks with."""
    # On the cloud side, reached through the VM's default route, as on GCE.
    run("ip", "-n", netns.cloud, "addr", "add", f"{METADATA_IP}/32", "dev", "lo")
    jwks, log = workdir / "google-jwks.json", workdir / "gce.log"
    process = netns.popen(
        sys.executable, "-c", GCE_EMULATOR, REPO / "tests", jwks, METADATA_IP, log=log
    )
    try:
        deadline = time.monotonic() + 30
        while "listening" not in (log.read_text() if log.exists() else ""):
            assert process.poll() is None, f"emulator exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"emulator not up in 30 s:\n{log.read_text()}"
            time.sleep(0.1)
        yield jwks
    finally:
        stop(process)


@pytest.mark.boot
def test_cloud_identity_user_data_has_no_secret_and_ends_healthy(
    tmp_path: Path, tarball: Path, netns: NetNS, package_url: tuple[str, str]
) -> None:
    with gce_metadata(netns, tmp_path) as jwks:
        # The dev CA verifies Google's JWT (here the emulator's key) and maps the instance
        # (emulators.CloudKeys.gce_jwt: my-project/vm-1) to the group's service account.
        ca_config = tmp_path / "ca.yaml"
        ca_config.write_text(
            f"gce: {{jwks: {jwks}}}\n"
            "identities:\n"
            "  - {source: GoogleComputeEngine, match: {project_id: my-project, instance_name:"
            " vm-1}, namespace: vm, serviceAccount: vm-web}\n"
        )
        with resolver(netns, tmp_path), devmesh(netns, tmp_path, ca_config) as keys:
            source = tmp_path / "vm-files"
            istioctl_output(keys, source)
            (source / "istio-token").unlink()  # not needed, not sent
            url, digest = package_url
            rendered = render(
                "cloud-identity.yaml", source, CREDENTIAL_FETCHER_TYPE="GoogleComputeEngine",
                VMAGENT_PACKAGE_URL=url, VMAGENT_PACKAGE_SHA256=digest,
            )  # fmt: skip
            assert rendered.returncode == 0, rendered.stderr
            assert "eyJ" not in rendered.stdout  # no JWT, no token of any kind
            root = Root(tmp_path / "root", tarball)
            seed(root, rendered.stdout)
            with booted(root, netns, tmp_path / "boot.log", until_booted=False) as machine:
                took = cloud_init_done(machine)
                view = check_vmagent_healthy(machine)
                identity = view["identity"]
                assert identity["spiffe_id"] == "spiffe://cluster.local/ns/vm/sa/vm-web"  # type: ignore[index]
                assert identity["source"] == "GoogleComputeEngine", identity  # type: ignore[index]
                # The dev CA verified the metadata server's JWT (not a token: there is none).
                log = (tmp_path / "devmesh.log").read_text()
                assert "authenticated GoogleComputeEngine caller" in log, log[-3000:]
                assert modes(machine, "/etc/vmagent", *CONFIG_FILES) == {
                    "/etc/vmagent": "root:vmagent 750",
                    **{path: "root:vmagent 640" for path in CONFIG_FILES},
                }
                assert not root.file("/etc/vmagent/istio-token").exists()
                hosts = root.file("/etc/hosts").read_text()
                assert "# BEGIN vmagent onboard" in hosts and HOSTS_LINE in hosts
                print(f"\ncloud-init (GCE identity): machine start -> status: done in {took:.1f} s")
