"""``vmagent onboard``'s pure core: check Istio's onboarding files, plan their installation,
edit the ``/etc/hosts`` block. Bytes and text in, values out; no I/O, no clock (``now`` is
passed in, UNIX seconds).

The files are what ``istioctl x workload entry configure`` writes (``istioctl/pkg/workload/
workload.go``; reference §7.1): ``cluster.env`` (``KEY='value'`` lines), ``mesh.yaml``
(MeshConfig with ``defaultConfig``), ``root-cert.pem`` (the ``istio-ca-root-cert`` configmap),
``istio-token`` (a TokenRequest JWT, audience ``istio-ca``, 1 h by default) and ``hosts``
(``<ingressIP> istiod[-<rev>].<ns>.svc``, empty when istioctl found no gateway IP).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import Mapping, Sequence

from cryptography import x509

from vmagent.config import ConfigError, env_key, parse_env_file, settings
from vmagent.config_names import is_hostname
from vmagent.identity.certs import ChainError, parse_certs
from vmagent.identity.tokens import decode_jwt, inspect_token
from vmagent.proxyconfig import ProxyConfigError, parse_mesh_config, parse_proxy_config_env

CLUSTER_ENV, MESH, ROOT_CERT, TOKEN, HOSTS = (
    "cluster.env", "mesh.yaml", "root-cert.pem", "istio-token", "hosts"
)
INSTALLED = (CLUSTER_ENV, MESH, ROOT_CERT, TOKEN)  # copied into the config directory
ALL_FILES = (*INSTALLED, HOSTS)
BACKUP_SUFFIX = ".vmagent-old"
FILE_MODE = 0o640  # root:vmagent; istio-token is a secret: the agent's group only
DIR_MODE = 0o750
TOKEN_NEAR = 15 * 60  # seconds: warn when the token expires sooner (istioctl's default is 1 h)
ROOT_NEAR = 30 * 86400  # seconds: warn when the mesh root expires sooner
REDO = "re-run `istioctl x workload entry configure` and copy the new files here"

BEGIN = b"# BEGIN vmagent onboard (istioctl hosts; remove with: vmagent onboard --remove-hosts)"
BEGIN_PREFIX = b"# BEGIN vmagent onboard"
END = b"# END vmagent onboard"


class OnboardError(ValueError):
    """Input that cannot be installed; the message names the file (and line or key)."""


@dataclasses.dataclass(frozen=True)
class HostEntry:
    """One ``IP name [name...]`` line of istioctl's ``hosts`` file."""

    ip: str
    names: tuple[str, ...]

    def line(self) -> bytes:
        return " ".join((self.ip, *self.names)).encode("ascii")


@dataclasses.dataclass(frozen=True)
class Checked:
    """The result of :func:`check_files`: ``errors`` (nothing may be installed when any),
    ``warnings`` and ``notes`` (worth reading, not fatal), the parsed ``hosts`` entries."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    hosts: tuple[HostEntry, ...]


def check_files(
    files: Mapping[str, bytes | None], source: str, now: float, hosts_needed: bool = True
) -> Checked:
    """Check the five files; ``files`` maps each name of ALL_FILES to its content (None:
    missing), ``source`` is the directory they came from (for messages). ``hosts_needed``
    False: the hosts file is not used (``--no-hosts``) and may be missing."""
    errors: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    hosts: tuple[HostEntry, ...] = ()
    for name in ALL_FILES:
        data = files.get(name)
        where = f"{source.rstrip('/')}/{name}"
        if data is None and name == HOSTS and not hosts_needed:
            continue
        if data is None:
            errors.append(f"{where}: missing; {REDO} (all five files are needed)")
            continue
        try:
            if name == ROOT_CERT:
                warnings += check_root_cert(data, where, now)
                continue
            text = data.decode("utf-8")
            if name == CLUSTER_ENV:
                check_cluster_env(text, where)
            elif name == MESH:
                check_mesh(text, where)
            elif name == TOKEN:
                token_warnings, token_notes = check_token(text, where, now)
                warnings += token_warnings
                notes += token_notes
            else:
                hosts = parse_hosts(text, where)
                if not hosts:
                    warnings.append(
                        f"{where}: no entries (istioctl found no gateway IP): /etc/hosts is "
                        "left as it is; istiod's name must resolve some other way, or re-run "
                        "istioctl with --ingressIP"
                    )
        except UnicodeDecodeError:
            errors.append(f"{where}: not UTF-8 text; {REDO}")
        except OnboardError as exc:
            errors.append(str(exc))
    return Checked(tuple(errors), tuple(warnings), tuple(notes), hosts)


def _check_settings(values: Mapping[str, str], where: str, lines: Mapping[str, int]) -> None:
    """Each key vmagent reads, parsed by its setting's own parser (vmagent.config)."""
    parsers = {env_key(f): f.metadata["parse"] for f in settings()}
    for key, raw in values.items():
        parse = parsers.get(key)
        if parse is None:
            continue  # Istio's other keys (ISTIO_SERVICE, CANONICAL_*...) are passed along
        try:
            parse(raw)
        except ValueError as exc:
            line = f":{lines[key]}" if key in lines else ""
            raise OnboardError(f"{where}{line}: {key}={raw!r}: {exc}") from None


def check_cluster_env(text: str, where: str) -> None:
    """OnboardError naming the line and key of the first bad line or value."""
    try:
        values = parse_env_file(text, where)
    except ConfigError as exc:
        raise OnboardError(f"{exc}; {REDO}") from None
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip().removeprefix("export ").strip().partition("=")[0]
        lines[key] = number
    _check_settings(values, where, lines)
    if "PROXY_CONFIG" in values:
        try:
            parse_proxy_config_env(values["PROXY_CONFIG"], f"{where}: PROXY_CONFIG")
        except ProxyConfigError as exc:
            raise OnboardError(str(exc)) from None


def check_mesh(text: str, where: str) -> None:
    """OnboardError if mesh.yaml is not a MeshConfig vmagent can use (vmagent.proxyconfig)."""
    try:
        config = parse_mesh_config(text, where)
    except ProxyConfigError as exc:
        raise OnboardError(f"{exc}; {REDO}") from None
    metadata = config.get("proxyMetadata") or {}
    _check_settings(metadata, f"{where}: defaultConfig.proxyMetadata", {})


def check_root_cert(data: bytes, where: str, now: float) -> list[str]:
    """Warnings; OnboardError unless ``data`` is PEM X.509 CA certificates, all valid now."""
    try:
        certs = parse_certs(data, where)
    except ChainError as exc:
        raise OnboardError(
            f"{exc}: expected the mesh's root CA certificate (PEM, '-----BEGIN CERTIFICATE-----'); "
            f"{REDO}"
        ) from None
    warnings: list[str] = []
    for index, cert in enumerate(certs, 1):
        which = f"{where}: certificate {index} ({cert.subject.rfc4514_string() or 'no subject'})"
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            warnings.append(f"{which}: no basicConstraints extension; assuming a CA")
            ca = True
        if not ca:
            raise OnboardError(
                f"{which}: not a CA certificate (basicConstraints CA:FALSE); root-cert.pem must "
                f"hold the mesh root (configmap istio-ca-root-cert), not a workload certificate"
            )
        after = cert.not_valid_after_utc.timestamp()
        if after <= now:
            raise OnboardError(f"{which}: expired on {_date(after)}; {REDO}")
        if cert.not_valid_before_utc.timestamp() > now + 300:
            warnings.append(
                f"{which}: not valid before {_date(cert.not_valid_before_utc.timestamp())}; "
                "check this machine's clock"
            )
        elif after - now < ROOT_NEAR:
            warnings.append(f"{which}: expires on {_date(after)}, in {_days(after - now)}")
    return warnings


def check_token(text: str, where: str, now: float) -> tuple[list[str], list[str]]:
    """(warnings, notes) for the bootstrap token; OnboardError if empty or expired. A JWT is
    decoded without verifying it (vmagent.identity.tokens), only to read ``exp`` and ``aud``;
    a token that is not a JWT is sent as it is, as Istio's agent does (reference §2)."""
    token = text.strip()
    if not token or any(c.isspace() for c in token):
        problem = "empty" if not token else "contains whitespace inside the token"
        raise OnboardError(f"{where}: {problem}; {REDO}")
    info = inspect_token(token)
    if info.problem.startswith("not a JWT"):
        return [], [f"{where}: not a JWT (opaque token): installed as it is, its lifetime unknown"]
    if info.expires_at is None:
        return [f"{where}: {info.problem}; its lifetime cannot be checked"], []
    left = info.expires_at - now
    if left <= 0:
        raise OnboardError(
            f"{where}: the token expired {_minutes(-left)} ago ({_date(info.expires_at)}); "
            f"istioctl's tokens last 1 h by default (--tokenDuration): {REDO}, then onboard "
            "and start vmagent within the hour"
        )
    warnings: list[str] = []
    if left < TOKEN_NEAR:
        warnings.append(
            f"{where}: the token expires in {_minutes(left)} ({_date(info.expires_at)}): start "
            f"vmagent before then, or {REDO}"
        )
    audience = decode_jwt(token).claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience or []
    if isinstance(audiences, list) and audiences and "istio-ca" not in audiences:
        warnings.append(f"{where}: audience {audiences!r}, not 'istio-ca': istiod may refuse it")
    notes = [f"{where}: JWT, expires {_date(info.expires_at)} (in {_minutes(left)})"]
    return warnings, notes


def parse_hosts(text: str, where: str) -> tuple[HostEntry, ...]:
    """``IP name [name...]`` lines (``#`` starts a comment); OnboardError naming the line."""
    entries: list[HostEntry] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.partition("#")[0].split()
        if not words:
            continue
        ip, names = words[0], tuple(words[1:])
        try:
            ipaddress.ip_address(ip.partition("%")[0])  # a zone (fe80::1%eth0) is allowed
        except ValueError:
            raise OnboardError(
                f"{where}:{number}: {ip!r} is not an IP address (expected 'IP name [name...]')"
            ) from None
        if not names:
            raise OnboardError(f"{where}:{number}: no name after {ip} (expected 'IP name')")
        for name in names:
            if not name.isascii() or not is_hostname(name):
                raise OnboardError(f"{where}:{number}: {name!r} is not a host name")
        entries.append(HostEntry(ip, names))
    return tuple(entries)


@dataclasses.dataclass(frozen=True)
class Existing:
    """What is at a destination now: content, owner, group, permission bits."""

    data: bytes
    uid: int
    gid: int
    mode: int


@dataclasses.dataclass(frozen=True)
class Action:
    """One file to write. ``kind``: "install" (new), "replace" (old content kept at
    ``backup``), "unchanged" (same content; ``fix`` when owner or mode must be set)."""

    kind: str
    name: str
    data: bytes
    uid: int | None  # None: leave as the process creates it (not root)
    gid: int | None
    mode: int
    backup: str | None = None
    fix: bool = False


def plan_files(
    files: Mapping[str, bytes], existing: Mapping[str, Existing | None], uid: int | None,
    gid: int | None,
) -> list[Action]:
    """The actions installing INSTALLED; ``existing`` maps each name to what is there now.
    ``uid`` None: no chown at all (not root); ``gid`` None with a ``uid``: an existing file
    keeps its group (the ``vmagent`` group does not exist), a new one gets the process's."""
    actions: list[Action] = []
    for name in INSTALLED:
        data, old = files[name], existing.get(name)
        group = gid if gid is not None or old is None or uid is None else old.gid
        if old is None:
            actions.append(Action("install", name, data, uid, group, FILE_MODE))
        elif old.data != data:
            actions.append(
                Action("replace", name, data, uid, group, FILE_MODE, backup=name + BACKUP_SUFFIX)
            )
        else:
            fix = old.mode != FILE_MODE or (uid is not None and (uid, group) != (old.uid, old.gid))
            actions.append(Action("unchanged", name, data, uid, group, FILE_MODE, fix=fix))
    return actions


def _lines(text: bytes) -> list[bytes]:
    return text.splitlines(keepends=True)


def _bare(line: bytes) -> bytes:
    return line.rstrip(b"\r\n").rstrip()


def _blocks(lines: Sequence[bytes], where: str) -> list[tuple[int, int]]:
    """(first, last) line index of each marked block; OnboardError on a broken marker."""
    found: list[tuple[int, int]] = []
    start: int | None = None
    for index, line in enumerate(lines):
        bare = _bare(line)
        if bare.startswith(BEGIN_PREFIX):
            if start is not None:
                raise OnboardError(f"{where}:{index + 1}: second BEGIN before END; fix by hand")
            start = index
        elif bare == END:
            if start is None:
                raise OnboardError(f"{where}:{index + 1}: END without BEGIN; fix by hand")
            found.append((start, index))
            start = None
    if start is not None:
        raise OnboardError(
            f"{where}:{start + 1}: '# BEGIN vmagent onboard' without '# END vmagent onboard'; "
            "fix the file by hand (vmagent does not guess where the block ends)"
        )
    return found


def set_block(text: bytes, entries: Sequence[HostEntry], where: str) -> bytes:
    """``text`` (a hosts file) with one marked block holding ``entries``: an existing block
    is replaced where it stands, else the block is appended. Every other byte is kept (a
    missing final newline is added before an appended block)."""
    lines = _lines(text)
    blocks = _blocks(lines, where)
    block = [BEGIN + b"\n", *(e.line() + b"\n" for e in entries), END + b"\n"]
    if not blocks:
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        return b"".join(lines + block)
    kept = _without(lines, blocks[1:])
    first, last = blocks[0]
    return b"".join(kept[:first] + block + kept[last + 1 :])


def remove_block(text: bytes, where: str) -> bytes:
    """``text`` without the marked blocks (no change when there is none)."""
    lines = _lines(text)
    return b"".join(_without(lines, _blocks(lines, where)))


def _without(lines: list[bytes], blocks: Sequence[tuple[int, int]]) -> list[bytes]:
    drop = {i for first, last in blocks for i in range(first, last + 1)}
    return [line for index, line in enumerate(lines) if index not in drop]


def conflicts(text: bytes, entries: Sequence[HostEntry], where: str) -> list[str]:
    """Warnings for names of ``entries`` that lines outside the block also name with another
    address: glibc's files backend answers with the first matching line, so those win."""
    lines = _lines(text)
    inside = {i for first, last in _blocks(lines, where) for i in range(first, last + 1)}
    wanted = {name.lower().rstrip("."): entry.ip for entry in entries for name in entry.names}
    warnings: list[str] = []
    for index, line in enumerate(lines):
        words = line.partition(b"#")[0].split()
        if index in inside or len(words) < 2:
            continue
        ip = words[0].decode("ascii", "replace")
        for word in words[1:]:
            name = word.decode("ascii", "replace").lower().rstrip(".")
            if name in wanted and wanted[name] != ip:
                warnings.append(
                    f"{where}:{index + 1}: {name} is already listed with {ip} (left as it is); "
                    f"that line wins over the onboard block's {wanted[name]}: remove it if stale"
                )
    return warnings


def _date(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min" if seconds >= 60 else f"{int(seconds)} s"


def _days(seconds: float) -> str:
    return f"{int(seconds // 86400)} days"
