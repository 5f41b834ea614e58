"""``vmagent onboard --from DIR``: install the files ``istioctl x workload entry configure``
writes into vmagent's configuration directory and put its ``hosts`` entries in /etc/hosts
(docs/onboard.md). Everything is checked before anything is written; each file is written to
a temporary file in its directory, fsynced and renamed into place.

Exit status: 0 done (warnings included), 2 bad input or no permission (nothing changed),
1 a write failed part way (the lines printed so far say what was done)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import grp
import os
import pwd
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmagent.config import Config, ConfigError, load_config
from vmagent.onboard import core

DEFAULT_GROUP = "vmagent"
DEFAULT_HOSTS = "/etc/hosts"
# Files a configuration directory may hold besides ours (the package's example).
_KNOWN_EXTRA = ("cluster.env.example",)
_LABEL = "security.selinux"
_DIR_VAR, _DEFAULT_DIR = "VMAGENT_CONFIG_DIR", "/etc/vmagent"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "onboard",
        help="install Istio's VM onboarding files (istioctl x workload entry configure)",
        description="Check and install cluster.env, mesh.yaml, root-cert.pem, istio-token into "
        "the configuration directory and add the hosts entries to /etc/hosts (docs/onboard.md).",
    )
    parser.add_argument("--from", dest="source", metavar="DIR", help="istioctl's output directory")
    parser.add_argument(
        "--config-dir", metavar="DIR", help="install here (default: $VMAGENT_CONFIG_DIR, else "
        "/etc/vmagent)"
    )
    parser.add_argument("--group", metavar="NAME", help=f"file group (default: {DEFAULT_GROUP})")
    parser.add_argument("--hosts-file", metavar="PATH", default=DEFAULT_HOSTS, help=DEFAULT_HOSTS)
    for flag, text in (
        ("--no-hosts", "leave the hosts file alone"),
        ("--remove-hosts", "only remove the block onboard added to the hosts file"),
        ("--dry-run", "check and print the plan, change nothing"),
    ):
        parser.add_argument(flag, action="store_true", help=text)
    # needs_config False: see _run (honoured when vmagent.cli supports it).
    parser.set_defaults(run=_run, needs_config=False)


class _Refused(Exception):
    """Nothing can be done; the message says what to do."""


def _run(args: argparse.Namespace, config: Config | None) -> int:
    """``config`` None: the command line did not load one (``needs_config`` False: a broken
    configuration must not stop the onboarding that replaces it)."""
    try:
        if args.remove_hosts:
            if args.source:
                raise _Refused("--remove-hosts takes no --from: run it on its own")
            return _remove_hosts(args)
        if not args.source:
            raise _Refused("--from DIR is required: the directory istioctl wrote the files to")
        return _onboard(args, config)
    except _Refused as exc:
        print(f"vmagent onboard: error: {exc}", file=sys.stderr)
        return 2


def _onboard(args: argparse.Namespace, config: Config | None) -> int:
    source = Path(args.source)
    if not source.is_dir():
        raise _Refused(f"{source}: no such directory; pass the directory istioctl's -o wrote")
    files: dict[str, bytes | None] = {}
    errors: list[str] = []
    for name in core.ALL_FILES:
        try:
            files[name] = (source / name).read_bytes()
        except FileNotFoundError:
            files[name] = None
        except OSError as exc:
            files[name] = b""
            errors.append(f"{source / name}: cannot read: {exc.strerror}")
    checked = core.check_files(files, str(source), time.time(), not args.no_hosts)
    errors += checked.errors
    if not errors:
        errors += _check_together(source)
    # The directory `vmagent run` reads: $VMAGENT_CONFIG_DIR, else the default.
    reads = config.vmagent_config_dir if config else os.environ.get(_DIR_VAR, _DEFAULT_DIR)
    target = Path(args.config_dir or reads)
    denied: list[str] = []  # permission problems: fatal, except in a dry run
    uid, gid, warnings, notes = _owner(args, target, errors, denied)
    warnings = [*checked.warnings, *warnings]
    hosts_path = Path(os.path.realpath(args.hosts_file))  # replace a symlink's target
    hosts_old: bytes | None = None
    hosts_new: bytes | None = None
    if not args.no_hosts and checked.hosts:
        hosts_old = _read_or_empty(hosts_path)
        try:
            hosts_new = core.set_block(hosts_old, checked.hosts, str(hosts_path))
            warnings += core.conflicts(hosts_old, checked.hosts, str(hosts_path))
        except core.OnboardError as exc:
            errors.append(str(exc))
        _need_writable(hosts_path.parent, "--hosts-file PATH, or --no-hosts", denied)
    if args.dry_run:
        warnings += [f"{line} (a real run would stop here)" for line in denied]
    else:
        errors += denied
    if errors:
        for line in errors:
            print(f"vmagent onboard: error: {line}", file=sys.stderr)
        print("vmagent onboard: nothing was installed", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"vmagent onboard: warning: {line}", file=sys.stderr)
    for line in (*checked.notes, *notes):
        print(f"note: {line}")
    good = {name: data for name, data in files.items() if data is not None}
    actions = core.plan_files(good, {n: _existing(target / n) for n in core.INSTALLED}, uid, gid)
    try:
        _do_dir(target, uid, gid, args.dry_run)
        for action in actions:
            _do_file(target, action, args.dry_run)
        if hosts_new is not None and hosts_old is not None:
            _do_hosts(hosts_path, hosts_old, hosts_new, len(checked.hosts), args.dry_run)
    except OSError as exc:
        print(f"vmagent onboard: error: {exc}; the lines above say what was done", file=sys.stderr)
        return 1
    if args.dry_run:
        print("dry run: nothing was changed")
        return 0
    _check_installed(target)
    if str(target) != reads:
        print(f"note: vmagent run reads {reads}: set {_DIR_VAR}={target} in its environment")
    print("next: systemctl restart vmagent   (not running yet: systemctl enable --now vmagent)")
    print("      vmagent status")
    return 0


def _check_together(source: Path) -> list[str]:
    """The files as the agent's own loader reads them (vmagent.config.load_config, with
    Istio's paths looked up under ``source``, where they are not), so rules between settings
    are checked too; the process environment is left out: the service has its own."""
    environ = {
        "VMAGENT_MESH_CONFIG": str(source / core.MESH),
        "XDS_ROOT_CA": str(source / core.ROOT_CERT),
        "VMAGENT_TOKEN_FILE": str(source / core.TOKEN),
    }
    try:
        load_config(environ, cluster_env=source / core.CLUSTER_ENV, root=source)
    except ConfigError as exc:
        return [f"the files together: {exc}"]
    return []


def _owner(
    args: argparse.Namespace, target: Path, errors: list[str], denied: list[str]
) -> tuple[int | None, int | None, list[str], list[str]]:
    """(uid, gid, warnings, notes): root:<group>; not root: (None, None), no chown."""
    if os.geteuid() != 0:
        if not args.config_dir and not os.environ.get(_DIR_VAR):
            denied.append(
                f"installing into {target} needs root: run `sudo vmagent onboard --from "
                f"{args.source}` (or pass --config-dir DIR, a directory you own, to try it out)"
            )
        else:
            _need_writable(target, "--config-dir DIR", denied)
        return None, None, [], [f"not root: chown skipped (the files are {_whoami()}'s)"]
    name = args.group or DEFAULT_GROUP
    try:
        return 0, grp.getgrnam(name).gr_gid, [], []
    except KeyError:
        if args.group:
            errors.append(f"--group {name}: no such group (see `getent group`)")
            return 0, None, [], []
        missing = (
            f"group {name!r} does not exist (the vmagent package creates it): the files keep "
            "their group (root for new ones), so only root can read istio-token; install the "
            "package or pass --group NAME"
        )
        return 0, None, [missing], []


def _need_writable(path: Path, instead: str, errors: list[str]) -> None:
    """An error unless this user may create files in ``path`` (or its nearest ancestor)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        errors.append(
            f"{probe}: not writable by {_whoami()}: run with sudo, or pass {instead}"
        )


def _whoami() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise _Refused(f"{path}: cannot read: {exc.strerror}") from None


def _existing(path: Path) -> core.Existing | None:
    try:
        info = path.stat()
        return core.Existing(path.read_bytes(), info.st_uid, info.st_gid, info.st_mode & 0o7777)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Refused(f"{path}: cannot read: {exc.strerror}") from None


def _show(path: Path, uid: int | None, gid: int | None, mode: int) -> str:
    info = path.stat() if path.exists() else None
    owner = uid if uid is not None else (info.st_uid if info else os.geteuid())
    group = gid if gid is not None else (info.st_gid if info else os.getegid())
    return f"{path}  {_name(pwd.getpwuid, owner)}:{_name(grp.getgrgid, group)} {mode:04o}"


def _name(lookup: Any, number: int) -> str:
    try:
        return str(lookup(number)[0])
    except KeyError:
        return str(number)


def _do_dir(target: Path, uid: int | None, gid: int | None, dry: bool) -> None:
    # Each line is printed once its action is done: after a failure they say what was.
    if not target.exists():
        line = f"{'would create' if dry else 'created':<13}{_show(target, uid, gid, core.DIR_MODE)}"
        if not dry:
            target.mkdir(parents=True, mode=0o700)
            _chown(target, uid, gid)
            os.chmod(target, core.DIR_MODE)
        print(line)
        return
    info = target.stat()
    others = sorted(
        entry.name for entry in target.iterdir()
        if not entry.name.startswith(".")
        and entry.name.removesuffix(core.BACKUP_SUFFIX) not in core.INSTALLED
        and entry.name not in _KNOWN_EXTRA
    )
    if others:  # not vmagent's own directory (--config-dir /etc?): leave its owner and mode
        print(f"{'kept':<13}{target} (owner and mode left as they are: it holds {others[0]}, ...)")
        return
    right = info.st_mode & 0o7777 == core.DIR_MODE and (
        uid is None or (uid, gid if gid is not None else info.st_gid) == (info.st_uid, info.st_gid)
    )
    verb = "unchanged" if right else ("would set" if dry else "set")
    line = f"{verb:<13}{_show(target, uid, gid, core.DIR_MODE)}"
    if not right and not dry:
        _chown(target, uid, gid)
        os.chmod(target, core.DIR_MODE)
    print(line)


def _do_file(target: Path, action: core.Action, dry: bool) -> None:
    path = target / action.name
    shown = _show(path, action.uid, action.gid, action.mode)
    if action.kind == "unchanged":
        if action.fix and not dry:
            _chown(path, action.uid, action.gid)
            os.chmod(path, action.mode)
        print(f"{'unchanged':<13}{shown}{' (owner/mode set)' if action.fix else ''}")
        return
    verb = {"install": "installed", "replace": "replaced"}[action.kind]
    if dry:
        verb = "would " + action.kind
    line = f"{verb:<13}{shown}" + (f" (old copy kept as {action.backup})" if action.backup else "")
    if dry:
        print(line)
        return
    if action.backup:
        old = path.stat()
        # The old copy may be a secret too: its owner, and never readable by others.
        _atomic_write(
            target / action.backup, path.read_bytes(), old.st_mode & 0o770, old.st_uid, old.st_gid
        )
    _atomic_write(path, action.data, action.mode, action.uid, action.gid)
    print(line)


def _do_hosts(path: Path, old: bytes, new: bytes, count: int, dry: bool) -> None:
    block = f"vmagent onboard block, {count} {'entry' if count == 1 else 'entries'}"
    if old == new:
        print(f"{'unchanged':<13}{path} ({block})")
        return
    if not dry:
        _rewrite_keeping_owner(path, new)
    print(f"{'would update' if dry else 'updated':<13}{path} ({block}; remove with: "
          "vmagent onboard --remove-hosts)")


def _remove_hosts(args: argparse.Namespace) -> int:
    path = Path(os.path.realpath(args.hosts_file))
    old = _read_or_empty(path)
    try:
        new = core.remove_block(old, str(path))
    except core.OnboardError as exc:
        raise _Refused(str(exc)) from None
    if new == old:
        print(f"{'unchanged':<13}{path} (no vmagent onboard block)")
        return 0
    errors: list[str] = []
    _need_writable(path.parent, "--hosts-file PATH", errors)
    if errors:
        raise _Refused(errors[0])
    if not args.dry_run:
        _rewrite_keeping_owner(path, new)
    print(f"{'would remove' if args.dry_run else 'removed':<13}vmagent onboard block from {path}")
    return 0


def _rewrite_keeping_owner(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, keeping its owner, group and mode (new: 0644)."""
    try:
        info = path.stat()
        mode, uid, gid = info.st_mode & 0o7777, info.st_uid, info.st_gid
    except FileNotFoundError:
        mode, uid, gid = 0o644, None, None
    try:
        _atomic_write(path, data, mode, uid, gid, like=path)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        # A bind-mounted /etc/hosts (containers) cannot be renamed over: write it in place.
        with open(path, "r+b") as out:
            out.truncate(0)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        print(f"note: {path} is a mount point: rewritten in place, not atomically")


def _chown(path: Path | int, uid: int | None, gid: int | None) -> None:
    if uid is None and gid is None:
        return
    try:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    except PermissionError:
        if os.geteuid() == 0:
            raise  # not root: keeping one's own ownership is fine


def _atomic_write(
    path: Path, data: bytes, mode: int, uid: int | None, gid: int | None, like: Path | None = None
) -> None:
    """Readers see the old or the new content, never a part: temporary file in the same
    directory, owner and mode set before any byte is written, fsync, rename, fsync dir.
    ``like``: a file whose SELinux label the new one takes (/etc/hosts is net_conf_t on
    EL9; a file created in /etc would get etc_t, which confined services cannot read)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            _chown(out.fileno(), uid, gid)
            os.fchmod(out.fileno(), mode)
            if like is not None:
                with contextlib.suppress(OSError):  # no label, or no SELinux here
                    os.setxattr(out.fileno(), _LABEL, os.getxattr(like, _LABEL))
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_installed(target: Path) -> None:
    """Warn when ``vmagent run`` (this environment, VMAGENT_CONFIG_DIR = ``target``) would
    read an onboarding file from somewhere else, e.g. an explicit XDS_ROOT_CA."""
    environ = {**os.environ, _DIR_VAR: str(target)}
    try:
        config = load_config(environ)
    except ConfigError as exc:
        print(f"vmagent onboard: warning: vmagent run would refuse this configuration: {exc}",
              file=sys.stderr)
        return
    for found in config.files:
        if Path(found.path).parent != target:
            print(f"vmagent onboard: warning: vmagent run reads the {found.role} from "
                  f"{found.path} ({found.how}), not from {target}", file=sys.stderr)
