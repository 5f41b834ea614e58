"""``vmagent onboard --from DIR``: install the files ``istioctl x workload entry configure``
writes into vmagent's configuration directory and put its ``hosts`` entries in /etc/hosts
(docs/onboard.md). Everything is checked before anything is written; each file is written to
a temporary file in its directory, fsynced and renamed into place.

Exit status: 0 done (warnings included), 2 bad input or no permission (nothing changed),
1 a write failed part way (the lines printed so far say what was done)."""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shlex
import socket
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from vmagent.config import Config, ConfigError, load_config
from vmagent.onboard import core, hosts, inputs, writes

DEFAULT_GROUP = "vmagent"
DEFAULT_HOSTS = "/etc/hosts"
# Files a configuration directory may hold besides ours (the package's example).
_KNOWN_EXTRA = ("cluster.env.example",)
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
    """Nothing can be done; each argument is one error line saying what to do."""


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
        for line in exc.args:
            print(f"vmagent onboard: error: {line}", file=sys.stderr)
        print("vmagent onboard: nothing was changed", file=sys.stderr)
        return 2


def _onboard(args: argparse.Namespace, config: Config | None) -> int:
    source = Path(os.path.abspath(args.source))  # messages and advice name absolute paths
    if not source.is_dir():
        problem = inputs.directory_problem(source) or "no such directory"
        raise _Refused(f"--from {source}: {problem}; pass the directory istioctl's -o wrote")
    hosts_path = Path(os.path.realpath(args.hosts_file))  # replace a symlink's target
    files: dict[str, bytes | None] = {}
    errors: list[str] = []
    unreadable: set[str] = set()  # reported once, as what they are (not as "empty")
    for name in core.ALL_FILES:
        if name == core.HOSTS and args.no_hosts:
            continue
        try:
            files[name] = inputs.read_regular(source / name, core.REDO)
        except inputs.InputError as exc:
            errors.append(str(exc))
            unreadable.add(name)
    checked = core.check_files(
        files, str(source), time.time(), not args.no_hosts, str(hosts_path), unreadable
    )
    errors += checked.errors
    if not checked.failed & {core.CLUSTER_ENV, core.MESH}:
        errors += _check_together(source, checked.failed)
    # The directory `vmagent run` reads: $VMAGENT_CONFIG_DIR, else the default.
    reads = os.path.abspath(
        config.vmagent_config_dir if config else os.environ.get(_DIR_VAR, _DEFAULT_DIR)
    )
    target = Path(os.path.abspath(args.config_dir)) if args.config_dir else Path(reads)
    denied: list[str] = []  # permission problems: fatal, except in a dry run
    uid, gid, warnings, notes = _owner(args, errors)
    existing = _target(args, target, source, errors, denied)
    warnings = [*checked.warnings, *warnings]
    hosts_old: bytes | None = None
    hosts_new: bytes | None = None
    if not args.no_hosts:
        hosts_old = _read_hosts(Path(os.path.abspath(args.hosts_file)), hosts_path, errors)
    if hosts_old is not None and checked.hosts:
        try:
            hosts_new = hosts.set_block(hosts_old, checked.hosts, str(hosts_path))
            warnings += hosts.conflicts(hosts_old, checked.hosts, str(hosts_path))
        except hosts.HostsError as exc:
            errors.append(str(exc))
        inputs.need_writable(hosts_path.parent, "--hosts-file PATH, or --no-hosts", denied)
    if args.dry_run:
        warnings += [f"{line} (a real run would stop here)" for line in denied]
    else:
        errors += denied
    if errors:
        raise _Refused(*errors)
    for line in warnings:
        print(f"vmagent onboard: warning: {line}", file=sys.stderr)
    for line in (*checked.notes, *notes):
        print(f"note: {line}")
    good = {name: data for name, data in files.items() if data is not None}
    actions = core.plan_files(good, existing, uid, gid)
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
    installed = _check_installed(target)
    if str(target) != reads:
        print(f"note: vmagent run reads {reads}: set {_DIR_VAR}={target} in its environment")
    run_dir = installed.vmagent_run_dir if installed else _default_run_dir()
    for line in core.next_steps(_agent_answers(Path(run_dir, "status.sock"))):
        print(line)
    return 0


def _check_together(source: Path, failed: Collection[str]) -> list[str]:
    """The files as the agent's own loader reads them (vmagent.config.load_config, with
    Istio's paths looked up under ``source``, where they are not), so rules between settings
    are checked too, and the workload identity is there; the process environment is left
    out: the service has its own. ``failed``: files already reported, not named again."""
    paths = (("VMAGENT_MESH_CONFIG", core.MESH), ("XDS_ROOT_CA", core.ROOT_CERT),
             ("VMAGENT_TOKEN_FILE", core.TOKEN))
    environ = {key: str(source / name) for key, name in paths if name not in failed}
    try:
        loaded = load_config(environ, cluster_env=source / core.CLUSTER_ENV, root=source)
    except ConfigError as exc:
        return [f"the files together: {exc}"]
    values = {key: str(getattr(loaded, key.lower())) for keys in core.IDENTITY for key in keys}
    return core.missing_identity(loaded.sources, values, str(source / core.CLUSTER_ENV))


def _target(
    args: argparse.Namespace, target: Path, source: Path, errors: list[str], denied: list[str]
) -> dict[str, core.Existing | None]:
    """What the configuration directory holds now (name -> file); its problems go to
    ``errors``, permission problems to ``denied``."""
    named = "--config-dir" if args.config_dir else (
        _DIR_VAR if os.environ.get(_DIR_VAR) else "the configuration directory"
    )
    problem = inputs.directory_problem(target)
    if problem:
        errors.append(
            f"{named} {target}: {problem}; name a directory (onboard creates a missing one)"
        )
        return {}
    if os.geteuid() != 0:
        if not args.config_dir and not os.environ.get(_DIR_VAR):
            denied.append(
                f"installing into {target} needs root: run `sudo vmagent onboard --from "
                f"{source}` (or pass --config-dir DIR, a directory you own, to try it out)"
            )
        else:
            inputs.need_writable(target, "--config-dir DIR", denied)
    existing: dict[str, core.Existing | None] = {}
    for name in core.INSTALLED:
        try:
            existing[name] = _existing(target / name)
        except inputs.InputError as exc:
            errors.append(str(exc))
    return existing


def _read_hosts(given: Path, real: Path, errors: list[str]) -> bytes | None:
    """The hosts file's content; None (and an error) if it is missing or not a file."""
    try:
        data = inputs.read_regular(given, "--hosts-file must name a hosts file, or pass --no-hosts")
    except inputs.InputError as exc:
        errors.append(str(exc))
        return None
    if data is None:
        errors.append(
            f"{real}: no such file; --hosts-file must name an existing hosts file (or pass "
            "--no-hosts)"
        )
    return data


def _owner(
    args: argparse.Namespace, errors: list[str]
) -> tuple[int | None, int | None, list[str], list[str]]:
    """(uid, gid, warnings, notes): root:<group>; not root: (None, None), no chown."""
    if os.geteuid() != 0:
        return None, None, [], [f"not root: chown skipped (the files are {inputs.whoami()}'s)"]
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


def _existing(path: Path) -> core.Existing | None:
    """What is installed at ``path`` now; InputError if it is not a file onboard may replace."""
    data = inputs.read_regular(path, "move it away: onboard installs a file there")
    if data is None:
        return None
    info = path.stat()
    return core.Existing(data, info.st_uid, info.st_gid, info.st_mode & 0o7777)


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
        shown = _show(target, uid, gid, core.DIR_MODE)
        line = core.row("would create" if dry else "created", shown)
        if not dry:
            target.mkdir(parents=True, mode=0o700)
            writes.chown(target, uid, gid)
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
        print(core.row("kept", f"{target} (owner and mode left as they are: it holds "
                       f"{others[0]}, ...)"))
        return
    right = info.st_mode & 0o7777 == core.DIR_MODE and (
        uid is None or (uid, gid if gid is not None else info.st_gid) == (info.st_uid, info.st_gid)
    )
    verb = "unchanged" if right else ("would set" if dry else "set")
    line = core.row(verb, _show(target, uid, gid, core.DIR_MODE))
    if not right and not dry:
        writes.chown(target, uid, gid)
        os.chmod(target, core.DIR_MODE)
    print(line)


def _do_file(target: Path, action: core.Action, dry: bool) -> None:
    path = target / action.name
    shown = _show(path, action.uid, action.gid, action.mode)
    if action.kind == "unchanged":
        if action.fix and not dry:
            writes.chown(path, action.uid, action.gid)
            os.chmod(path, action.mode)
        print(core.row("unchanged", shown + (" (owner/mode set)" if action.fix else "")))
        return
    verb = {"install": "installed", "replace": "replaced"}[action.kind]
    if dry:
        verb = "would " + action.kind
    line = core.row(verb, shown) + (
        f" (old copy kept as {action.backup})" if action.backup else ""
    )
    if dry:
        print(line)
        return
    if action.backup:
        old = path.stat()
        # The old copy may be a secret too: its owner, and never readable by others.
        writes.atomic_write(
            target / action.backup, path.read_bytes(), old.st_mode & 0o770, old.st_uid, old.st_gid
        )
    writes.atomic_write(path, action.data, action.mode, action.uid, action.gid)
    print(line)


def _do_hosts(path: Path, old: bytes, new: bytes, count: int, dry: bool) -> None:
    block = f"vmagent onboard block, {count} {'entry' if count == 1 else 'entries'}"
    if old == new:
        print(core.row("unchanged", f"{path} ({block})"))
        return
    note = None if dry else writes.rewrite_keeping_owner(path, new)
    # The removal command as it must be typed for this file (not /etc/hosts's by default).
    remove = "vmagent onboard --remove-hosts" + (
        "" if str(path) == DEFAULT_HOSTS else f" --hosts-file {shlex.quote(str(path))}"
    )
    verb = "would update" if dry else "updated"
    print(core.row(verb, f"{path} ({block}; remove with: {remove})"))
    if note:
        print(f"note: {note}")


def _remove_hosts(args: argparse.Namespace) -> int:
    path = Path(os.path.realpath(args.hosts_file))
    errors: list[str] = []
    old = _read_hosts(Path(os.path.abspath(args.hosts_file)), path, errors)
    if old is None:
        raise _Refused(*errors)
    try:
        new = hosts.remove_block(old, str(path))
    except hosts.HostsError as exc:
        raise _Refused(str(exc)) from None
    if new == old:
        print(core.row("unchanged", f"{path} (no vmagent onboard block)"))
        return 0
    inputs.need_writable(path.parent, "--hosts-file PATH", errors)
    if errors:
        raise _Refused(*errors)
    note = None if args.dry_run else writes.rewrite_keeping_owner(path, new)
    print(core.row("would remove" if args.dry_run else "removed",
                   f"vmagent onboard block from {path}"))
    if note:
        print(f"note: {note}")
    return 0


def _default_run_dir() -> str:
    return os.environ.get("VMAGENT_RUN_DIR") or "/run/vmagent"


def _agent_answers(path: Path) -> bool:
    """Whether an agent accepts connections on its status socket (a connect, nothing sent):
    a socket file can outlive its agent (a crash, a test), so its existence says nothing.
    Cannot tell (no permission): True, the advice that is right either way (restart)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return False
        except OSError:
            return True
    return True


def _check_installed(target: Path) -> Config | None:
    """The configuration ``vmagent run`` (this environment, VMAGENT_CONFIG_DIR = ``target``)
    would load, None if it would refuse it; warns when it would read an onboarding file from
    somewhere else, e.g. an explicit XDS_ROOT_CA."""
    environ = {**os.environ, _DIR_VAR: str(target)}
    try:
        config = load_config(environ)
    except ConfigError as exc:
        print(f"vmagent onboard: warning: vmagent run would refuse this configuration: {exc}",
              file=sys.stderr)
        return None
    for found in config.files:
        if Path(found.path).parent != target:
            print(f"vmagent onboard: warning: vmagent run reads the {found.role} from "
                  f"{found.path} ({found.how}), not from {target}", file=sys.stderr)
    return config
