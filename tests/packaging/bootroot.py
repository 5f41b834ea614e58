"""Boot the installed packages with real systemd: Debian roots, network namespaces, devmesh.

- :func:`base_tarball`: a Debian 12 root made by ``mmdebstrap`` (about 30 s), once per test
  session, with what the .deb depends on plus systemd, cloud-init and curl.
- :class:`Root`: that tarball unpacked into a test's directory; ``.deb`` files installed into it
  offline with ``apt-get`` run inside ``systemd-nspawn`` (no boot).
- :class:`NetNS`: the VM's network namespace and a "cloud" one this test makes, joined by a
  veth pair: the VM has a real address (``VM_IP``) and a default route; devmesh (from this
  checkout) and a dnsmasq resolver run on the cloud side at ``CLOUD_IP``, as istiod and a
  VPC resolver would. Nothing else is reachable.
- :class:`Machine`: ``systemd-nspawn --boot`` of a root (systemd as PID 1) in that namespace;
  commands run inside with ``nsenter`` into the container's namespaces, as
  ``machinectl shell`` would (there is no system bus here, hence ``--register=no
  --keep-unit``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import count
from pathlib import Path

import psutil
import pytest
from pkgtools import REPO, run

SUITE = "bookworm"
PACKAGES = (
    "systemd,systemd-sysv,dbus,python3.11,iptables,iproute2,adduser,"
    "cloud-init,curl,ca-certificates,netbase"
)
VM_IP = "10.77.0.2"
# The VM's network: its resolver, and istiod (devmesh) on 15012 (debug 15014).
CLOUD_IP = "10.77.0.1"
RESOLVER_IP = CLOUD_IP
# The resolver's own name (not a mesh name): host DNS must keep answering it.
HOST_NAME, HOST_NAME_IP = "db.example.internal", "10.77.0.99"
DEVMESH_ADDR = "10.77.0.1:15012"
ISTIOD_NAME = "istiod.istio-system.svc"  # devmesh's certificate names it
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VMAGENT = Path(sys.executable).parent / "vmagent"
_names = count()


def skip_unless_bootable() -> None:
    """pytest.skip with the reason where this machine cannot boot a container."""
    if os.geteuid() != 0:
        pytest.skip("boot tests need root (systemd-nspawn, ip netns)")
    missing = [
        f"{tool} (apt-get install {pkg})"
        for tool, pkg in {
            "mmdebstrap": "mmdebstrap",
            "systemd-nspawn": "systemd-container",
            "nsenter": "util-linux",
            "ip": "iproute2",
        }.items()
        if shutil.which(tool) is None
    ]
    if missing:
        pytest.skip("boot tools missing: " + ", ".join(missing) + "; run scripts/setup --test")
    probe = run("ip", "netns", "add", "vmagent-probe", check=False)
    run("ip", "netns", "del", "vmagent-probe", check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {probe.stderr.strip()}")


def base_tarball(directory: Path) -> Path:
    """A Debian 12 root as a tarball in ``directory``, made once (reused if present).
    ``VMAGENT_TEST_ROOT_TARBALL`` names a ready one (a development shortcut)."""
    given = os.environ.get("VMAGENT_TEST_ROOT_TARBALL")
    if given:
        return Path(given)
    tarball = directory / f"debian-{SUITE}.tar"
    if not tarball.exists():
        partial = directory / "partial.tar"
        result = run(
            "mmdebstrap", "--variant=apt", f"--include={PACKAGES}", SUITE, partial,
            check=False, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, f"mmdebstrap failed:\n{result.stderr[-3000:]}"
        partial.rename(tarball)
    return tarball


class Root:
    """A Debian root directory for one test."""

    def __init__(self, path: Path, tarball: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        run("tar", "-C", path, "-xf", tarball, timeout=300)
        # cloud-init stays off unless a test seeds it (it would look for a datasource).
        (path / "etc/cloud/cloud-init.disabled").touch()
        # The VM's resolver is the cloud network's (resolver() below), short timeouts.
        resolv = path / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        resolv.write_text(f"nameserver {RESOLVER_IP}\noptions timeout:2 attempts:1\n")

    def file(self, inside: str) -> Path:
        return self.path / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> Path:
        target = self.file(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
        return target

    def gid(self, group: str) -> int:
        """``group``'s gid in the root's /etc/group."""
        for line in self.file("/etc/group").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == group:
                return int(fields[2])
        raise AssertionError(f"no group {group} in the root")

    def offline(self, *command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``command`` inside the root, no boot, no network."""
        return run(
            "systemd-nspawn", "-q", "-D", self.path, "--register=no", "--keep-unit",
            "--private-network", "--setenv=DEBIAN_FRONTEND=noninteractive",
            f"--setenv=PATH={PATH}", *command, check=False, timeout=timeout,
        )  # fmt: skip

    def copy_in(self, package: Path) -> str:
        """``package`` copied to /var/tmp/pkgs in the root; its path inside."""
        target = self.file(f"/var/tmp/pkgs/{package.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package, target)
        return f"/var/tmp/pkgs/{package.name}"

    def install_offline(self, deb: Path) -> subprocess.CompletedProcess[str]:
        """``apt-get install ./vmagent.deb`` in the root, not booted (no systemd running)."""
        inside = self.copy_in(deb)
        result = self.offline("apt-get", "install", "-y", "-q", inside)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result


class NetNS:
    """Two network namespaces joined by a veth pair: the VM's (``name``: eth0 = ``VM_IP``/24,
    default route to the cloud side) and the cloud network's (``name``-cloud: eth1 =
    ``CLOUD_IP``/24), where the control plane and the resolver run (:meth:`popen`)."""

    def __init__(self) -> None:
        self.name = f"vmagent-boot-{os.getpid()}-{next(_names)}"
        self.cloud = f"{self.name}-cloud"
        run("ip", "netns", "add", self.name)
        run("ip", "netns", "add", self.cloud)
        run(
            "ip", "link", "add", "eth0", "netns", self.name, "type", "veth",
            "peer", "name", "eth1", "netns", self.cloud,
        )  # fmt: skip
        for namespace, command in (
            (self.name, ["link", "set", "lo", "up"]),
            (self.name, ["addr", "add", f"{VM_IP}/24", "dev", "eth0"]),
            (self.name, ["link", "set", "eth0", "up"]),
            (self.name, ["route", "add", "default", "via", CLOUD_IP]),
            (self.cloud, ["link", "set", "lo", "up"]),
            (self.cloud, ["addr", "add", f"{CLOUD_IP}/24", "dev", "eth1"]),
            (self.cloud, ["link", "set", "eth1", "up"]),
        ):
            run("ip", "-n", namespace, *command)

    @property
    def path(self) -> str:
        """The VM's namespace, for ``systemd-nspawn --network-namespace-path``."""
        return f"/run/netns/{self.name}"

    def popen(self, *argv: str | Path, log: Path) -> subprocess.Popen[bytes]:
        """``argv`` on the cloud side (reached from the VM at ``CLOUD_IP``)."""
        with log.open("ab") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.cloud, *map(str, argv)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def cloud_run(self, *argv: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``argv`` on the cloud side, waited for."""
        return run("ip", "netns", "exec", self.cloud, *argv, check=False, timeout=timeout)

    def delete(self) -> None:
        run("ip", "netns", "del", self.name, check=False)
        run("ip", "netns", "del", self.cloud, check=False)


def stop(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextmanager
def devmesh(netns: NetNS, workdir: Path, ca_config: Path | None = None) -> Iterator[Path]:
    """The test checkout's devmesh (its example mesh) in ``netns`` on DEVMESH_ADDR; yields its
    key directory (root-cert.pem). ``ca_config``: the dev CA's settings file (cloud
    identities, docs/identity.md). Stopped at exit."""
    keys = workdir / "devmesh-keys"
    log = workdir / "devmesh.log"
    extra = ("--ca-config", ca_config) if ca_config else ()
    process = netns.popen(
        VMAGENT, "devmesh", "serve", "--config", REPO / "examples" / "devmesh", "--dir", keys,
        "--listen", DEVMESH_ADDR, "--debug-listen", f"{CLOUD_IP}:15014", "--log-level", "info",
        *extra, log=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "devmesh listening" not in (log.read_text() if log.exists() else ""):
            assert process.poll() is None, f"devmesh exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"devmesh not up in 60 s:\n{log.read_text()}"
            time.sleep(0.1)
        yield keys
    finally:
        stop(process)


@contextmanager
def resolver(netns: NetNS, workdir: Path) -> Iterator[None]:
    """dnsmasq as the cloud network's resolver on RESOLVER_IP:53 in ``netns``: answers
    HOST_NAME, NXDOMAIN for anything else (no upstream)."""
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    process = netns.popen(
        dnsmasq, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
        f"--listen-address={RESOLVER_IP}", "--pid-file",
        f"--address=/{HOST_NAME}/{HOST_NAME_IP}", "--log-facility=-",
        log=workdir / "resolver.log",
    )  # fmt: skip
    try:
        time.sleep(0.3)
        assert process.poll() is None, (workdir / "resolver.log").read_text()
        yield
    finally:
        stop(process)


@contextmanager
def serve_http(netns: NetNS, directory: Path, workdir: Path, port: int = 8080) -> Iterator[str]:
    """``directory`` over HTTP (``python3 -m http.server``) on RESOLVER_IP:``port`` in
    ``netns``, as a download server on the cloud network; yields its base URL."""
    log = workdir / "http.log"
    process = netns.popen(
        sys.executable, "-u", "-m", "http.server", "--bind", RESOLVER_IP,
        "--directory", directory, str(port), log=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "Serving HTTP" not in (log.read_text() if log.exists() else ""):
            assert process.poll() is None, f"http.server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"http.server not up in 30 s:\n{log.read_text()}"
            time.sleep(0.1)
        yield f"http://{RESOLVER_IP}:{port}"
    finally:
        stop(process)


def onboarding_files(keys: Path, **cluster_env: str) -> dict[str, str]:
    """The files ``istioctl x workload entry configure`` writes, for devmesh's example group
    vm/vm-web, shaped as istioctl writes them: istiod by name in mesh.yaml, its address in
    ``hosts``. ``cluster_env`` adds keys."""
    token = run(
        VMAGENT, "devmesh", "token", "--dir", keys, "--namespace", "vm",
        "--service-account", "vm-web",
    ).stdout.strip()  # fmt: skip
    env = {
        "POD_NAMESPACE": "vm",
        "SERVICE_ACCOUNT": "vm-web",
        "TRUST_DOMAIN": "cluster.local",
        "ISTIO_META_AUTO_REGISTER_GROUP": "vm-web",
        "ISTIOD_SAN": "istiod.istio-system.svc",
        **cluster_env,
    }
    return {
        "cluster.env": "".join(f"{k}={v}\n" for k, v in env.items()),
        "mesh.yaml": f"defaultConfig:\n  discoveryAddress: {ISTIOD_NAME}:15012\n",
        "root-cert.pem": (keys / "root-cert.pem").read_text(),
        "istio-token": token + "\n",
        "hosts": f"{CLOUD_IP} {ISTIOD_NAME}\n",
    }


class Machine:
    """A booted root: systemd as PID 1 in its own PID/mount/UTS/IPC namespaces, in ``netns``."""

    def __init__(self, root: Root, netns: NetNS, log: Path, until_booted: bool = True) -> None:
        """``until_booted`` False: return once systemd runs, before its boot jobs are done
        (cloud-init's final stage is one of them: the cloud-init tests watch it themselves)."""
        self.root = root
        self.log = log
        with log.open("ab") as out:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn", "-q", "-D", str(root.path), "--boot", "--register=no",
                    "--keep-unit", f"--network-namespace-path={netns.path}",
                    # Not implied by a given namespace (only by --private-network): capture.
                    "--capability=CAP_NET_ADMIN", "--console=pipe",
                    # /etc/resolv.conf is the root's own (Root): the cloud network's resolver.
                    "--resolv-conf=off",
                ],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.leader = self._find_leader()
        if not until_booted:
            return
        self.wait_for(
            lambda: (
                self.sh("systemctl is-system-running").stdout.strip() in ("running", "degraded")
            ),
            60,
            "systemd to finish booting",
        )

    def _find_leader(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.nspawn.poll() is None, f"nspawn exited:\n{self.log.read_text()[-3000:]}"
            with suppress(psutil.Error):
                for child in psutil.Process(self.nspawn.pid).children():
                    if child.name() in ("systemd", "init"):
                        return child.pid
            time.sleep(0.05)
        raise AssertionError(f"no container init after 30 s:\n{self.log.read_text()[-3000:]}")

    def sh(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``sh -c script`` inside the machine as root (stdout, stderr, returncode)."""
        return subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", "/usr/bin/env", "-i",
             f"PATH={PATH}", "LANG=C.UTF-8", "/bin/sh", "-c", script],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def wait_for(self, ready: object, seconds: float, what: str) -> None:
        """Poll ``ready()`` every 0.2 s for up to ``seconds``; fail naming ``what``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ready():  # type: ignore[operator]
                return
            assert self.nspawn.poll() is None, f"machine stopped:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)
        journal = self.sh("journalctl -b --no-pager -n 80").stdout
        raise AssertionError(f"timed out after {seconds} s waiting for {what}\n{journal}")

    def main_pid(self, unit: str = "vmagent") -> int:
        return int(self.sh(f"systemctl show -P MainPID {unit}").stdout.strip() or 0)

    def poweroff(self, timeout: float = 60) -> None:
        if self.nspawn.poll() is None:
            self.sh("systemctl --no-block poweroff")
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)


@contextmanager
def booted(root: Root, netns: NetNS, log: Path, until_booted: bool = True) -> Iterator[Machine]:
    machine = Machine(root, netns, log, until_booted)
    try:
        yield machine
    finally:
        machine.poweroff()
