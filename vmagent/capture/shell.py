"""Shell of traffic capture: run ``iptables-save``/``iptables-restore`` and the DNS watchdog.

Each change is one ``iptables-restore --noflush`` transaction per address family, computed by
:func:`vmagent.capture.rules.restore_text` from what ``iptables-save`` shows now, under a file
lock so ``vmagent capture apply``, ``vmagent run`` and the watchdog never interleave. Whichever
``iptables`` is installed is used (nft or legacy backend). IPv6 is skipped when the host has no
IPv6 (``/proc/net/if_inet6`` absent). Needs CAP_NET_ADMIN. Errors: :class:`CaptureError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vmagent.capture.rules import CaptureSpec, build, nameservers, parse_save, restore_text
from vmagent.capture.watch import FailOpen
from vmagent.config import Config
from vmagent.config_paths import CLUSTER_ENV
from vmagent.config_values import split_host_port

log = logging.getLogger(__name__)

# Users exempt by default when they exist: vmagent's packaged users (the agent; Envoy) and
# Istio's (reference §3.6, §7.2).
PROXY_USERS = ("vmagent", "vmagent-envoy", "istio-proxy")
DEFAULT_PROXY_ID = "1337"
WATCH_INTERVAL = 1.0  # seconds between probes of the agent's DNS port
WATCH_PROBE_TIMEOUT = 0.5
WATCH_PID = "capture-watch.pid"
# Left in VMAGENT_RUN_DIR by apply, removed by clean: a `vmagent run` without CAP_NET_ADMIN
# (as the exempt user, Istio's VM way) takes it as "installed by root" (vmagent/agent_capture.py).
APPLIED_MARKER = "capture.applied"
# The DNS redirect's state as last set (apply, the watchdog), for `vmagent status`: JSON
# {"dns_redirect": "on"|"off", "error": str|null}; absent when DNS is not captured.
DNS_STATE = "capture-dns.json"


class CaptureError(RuntimeError):
    """iptables is missing or refused the rules; the message says which and what to do."""


def spec_of(config: Config) -> CaptureSpec:
    """The capture wanted by ``config``; reads resolv.conf and the user database."""
    uids, gids = proxy_ids(config)
    try:
        resolv = Path(config.vmagent_resolv_conf).read_text(encoding="utf-8", errors="replace")
    except OSError:
        resolv = ""
    servers = nameservers(resolv)
    return CaptureSpec(
        proxy_uids=uids,
        proxy_gids=gids,
        dns_capture=config.istio_meta_dns_capture,
        capture_all_dns=config.capture_all_dns,
        nameservers=servers,
        dns_port=str(dns_port(config)),
        inbound_port=str(config.inbound_capture_port),
        service_cidrs=config.istio_service_cidr,
        service_exclude_cidrs=config.istio_service_exclude_cidr,
        inbound_ports=config.istio_inbound_ports,
        inbound_exclude_ports=config.istio_local_exclude_ports,
        outbound_ports=config.istio_outbound_ports,
        outbound_exclude_ports=config.istio_local_outbound_ports_exclude,
    )


def proxy_ids(config: Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(uids, gids) exempt from capture. PROXY_UID, else the uids of those of PROXY_USERS that
    exist (the agent's upstream queries and Envoy's outbound must both escape), else 1337
    (Istio: ENVOY_USER's uid, else 1337; tools/common/config/config.go). PROXY_GID, else the
    same numbers as PROXY_UID as Istio does; for users found by name their primary groups
    instead, since a gid need not equal its uid (the uid's number taken as a gid could exempt
    an unrelated group's traffic)."""
    if config.proxy_uid:
        return config.proxy_uid, config.proxy_gid or config.proxy_uid
    uids: list[str] = []
    gids: list[str] = []
    for name in PROXY_USERS:
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        uids += [str(user.pw_uid)] if str(user.pw_uid) not in uids else []
        gids += [str(user.pw_gid)] if str(user.pw_gid) not in gids else []
    if not uids:
        uids = gids = [DEFAULT_PROXY_ID]
    return tuple(uids), config.proxy_gid or tuple(gids)


def dns_address(config: Config) -> tuple[str, int]:
    """(host, port) of the agent's DNS proxy: DNS_PROXY_ADDR's first entry (localhost =
    127.0.0.1), port 15053 by default."""
    for item in config.dns_proxy_addr:
        host, port = split_host_port(item, 15053)
        return ("127.0.0.1" if host == "localhost" else host), port or 15053
    return "127.0.0.1", 15053


def dns_port(config: Config) -> int:
    """The port DNS is redirected to (Istio: always 15053)."""
    return dns_address(config)[1]


def wanted(config: Config) -> bool:
    """Whether cluster.env asks for any capture (what ``vmagent run`` should check)."""
    return bool(
        config.istio_meta_dns_capture or config.istio_service_cidr or config.istio_inbound_ports
    )


def _families() -> list[int]:
    return [4, 6] if Path("/proc/net/if_inet6").exists() else [4]


def _tool(family: int, what: str) -> str:
    name = f"{'ip6' if family == 6 else 'ip'}tables-{what}"
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise CaptureError(f"{name} not found: install the iptables package")
    return found


def _run(argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        hint = " (run as root or with CAP_NET_ADMIN)" if "ermission denied" in done.stderr else ""
        shown = f"\n{stdin}" if stdin else ""
        raise CaptureError(f"{' '.join(argv)} failed: {done.stderr.strip()}{hint}{shown}")
    return done.stdout


@contextlib.contextmanager
def _locked(config: Config) -> Iterator[None]:
    run_dir = Path(config.vmagent_run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "capture.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def plan(config: Config, dns_live: bool = True, clean: bool = False) -> dict[int, str]:
    """{family: restore text} that apply (or ``clean``) would run now; "" = nothing."""
    spec = spec_of(config)
    texts = {}
    for family in _families():
        saved = parse_save(_run([_tool(family, "save")]))
        texts[family] = restore_text(saved, None if clean else build(spec, family, dns_live))
    return texts


def _transact(config: Config, dns_live: bool, clean: bool) -> None:
    with _locked(config):
        for family, text in plan(config, dns_live, clean).items():
            if text:
                _run([_tool(family, "restore"), "--noflush"], text)


def probe(config: Config) -> bool:
    """Whether the agent's DNS proxy accepts a TCP connection now: its socket exists, which
    kill -9 ends at once (the kernel closes it)."""
    try:
        with socket.create_connection(dns_address(config), timeout=WATCH_PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def initial_dns_live(config: Config, watchdog: bool) -> bool:
    """DNS redirect state apply starts with: with the watchdog, only if the agent answers."""
    return probe(config) if watchdog and spec_of(config).dns_active() else True


def apply_capture(config: Config, watchdog: bool = True) -> None:
    """Install the capture ``config`` asks for (idempotent; CaptureError if iptables refuses).
    With DNS capture and ``watchdog``, DNS is redirected only while the agent's DNS port
    answers, and a detached ``vmagent capture watch`` keeps it so (fail-open,
    docs/capture.md)."""
    spec = spec_of(config)
    if spec.dns_capture and not spec.dns_active():
        log.warning(
            "capture: ISTIO_META_DNS_CAPTURE is set but %s lists no nameserver and"
            " CAPTURE_ALL_DNS is false: DNS is not captured (as Istio)",
            config.vmagent_resolv_conf,
        )
    _stop_watchdog(config)
    live = initial_dns_live(config, watchdog)
    _transact(config, live, clean=False)
    record_dns(config, live if spec.dns_active() else None)
    if watchdog and spec.dns_active():
        _start_watchdog(config)
    (Path(config.vmagent_run_dir) / APPLIED_MARKER).write_text("vmagent capture apply\n")


def clean_capture(config: Config) -> None:
    """Stop the watchdog and remove every vmagent chain and hook (idempotent)."""
    _stop_watchdog(config)
    _transact(config, dns_live=True, clean=True)
    (Path(config.vmagent_run_dir) / APPLIED_MARKER).unlink(missing_ok=True)
    record_dns(config, None)


def record_dns(config: Config, live: bool | None, error: str | None = None) -> None:
    """Leave the DNS redirect's state in DNS_STATE for the agent's status (None: DNS not
    captured, the file is removed). Best effort: a status hint must never stop capture."""
    path = Path(config.vmagent_run_dir) / DNS_STATE
    try:
        if live is None:
            path.unlink(missing_ok=True)
            return
        text = json.dumps({"dns_redirect": "on" if live else "off", "error": error})
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a document
    except OSError as exc:
        log.debug("capture: cannot record the DNS redirect state in %s: %s", path, exc)


def read_dns_state(run_dir: str) -> tuple[str | None, float | None, str | None]:
    """(``"on"``/``"off"``/None, when it last changed as epoch seconds, the watchdog's last
    error) from DNS_STATE in ``run_dir``; (None, None, None) when absent or unreadable."""
    path = Path(run_dir) / DNS_STATE
    try:
        since = path.stat().st_mtime
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None, None
    if not isinstance(doc, dict) or doc.get("dns_redirect") not in ("on", "off"):
        return None, None, None
    error = doc.get("error")
    return str(doc["dns_redirect"]), since, str(error) if error else None


def watch(config: Config) -> None:
    """The watchdog loop: probe every WATCH_INTERVAL, switch the DNS redirect on/off as
    :class:`FailOpen` decides, and re-apply when resolv.conf's nameservers change (the rules
    name them). Runs until killed (``clean`` sends SIGTERM)."""
    state = FailOpen(live=None)
    servers = spec_of(config).nameservers
    while True:
        change = state.observe(probe(config))
        now_servers = spec_of(config).nameservers
        if change is not None or (now_servers != servers and state.live is not None):
            live = bool(state.live)
            log.warning(
                "capture: agent DNS %s, nameservers %s: DNS redirect %s",
                "answers" if live else "is down",
                ",".join(now_servers) or "none",
                "on" if live else "off (fail-open)",
            )
            try:
                _transact(config, dns_live=live, clean=False)
                servers = now_servers
                record_dns(config, live)
            except CaptureError as exc:
                log.error("capture: %s", exc)
                before = read_dns_state(config.vmagent_run_dir)[0]  # the switch did not happen
                record_dns(config, None if before is None else before == "on", str(exc))
                state = FailOpen(live=None)  # retry on the next probe
        time.sleep(WATCH_INTERVAL)


def _pid_file(config: Config) -> Path:
    return Path(config.vmagent_run_dir) / WATCH_PID


def _start_watchdog(config: Config) -> None:
    argv = [sys.executable, "-m", "vmagent", "capture", "watch"]
    cluster_env = next((f for f in config.files if f.role == CLUSTER_ENV and f.exists), None)
    if cluster_env is not None:  # the watchdog must see the same settings
        argv += ["--cluster-env", cluster_env.path]
    log_path = Path(config.vmagent_run_dir) / "capture-watch.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    _pid_file(config).write_text(f"{proc.pid}\n")


def _stop_watchdog(config: Config) -> None:
    path = _pid_file(config)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    if _is_watchdog(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while _is_watchdog(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    path.unlink(missing_ok=True)


def _is_watchdog(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if status == "Z":  # our own un-reaped child
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return b"capture" in cmdline and b"watch" in cmdline
