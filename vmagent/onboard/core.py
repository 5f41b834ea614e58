"""``vmagent onboard``'s pure core: check Istio's onboarding files, plan their installation,
word the action lines (the hosts block: :mod:`vmagent.onboard.hosts`). Bytes and text in,
values out; no I/O, no clock (``now`` is passed in, UNIX seconds).

The files are what ``istioctl x workload entry configure`` writes (``istioctl/pkg/workload/
workload.go``; reference §7.1): ``cluster.env`` (``KEY='value'`` lines), ``mesh.yaml``
(MeshConfig with ``defaultConfig``), ``root-cert.pem`` (the ``istio-ca-root-cert`` configmap),
``istio-token`` (a TokenRequest JWT, audience ``istio-ca``, 1 h by default) and ``hosts``
(``<ingressIP> istiod[-<rev>].<ns>.svc``, empty when istioctl found no gateway IP).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Collection, Mapping

from cryptography import x509

from vmagent.config import ConfigError, env_key, parse_env_file, settings
from vmagent.identity.certs import ChainError, parse_certs
from vmagent.identity.tokens import decode_jwt, inspect_token
from vmagent.onboard.hosts import HostEntry, hosts_lines
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
# The workload identity: namespace and service account (reference §7.1: istioctl always
# writes both); ISTIO_NAMESPACE stands in for POD_NAMESPACE (vmagent.config.Config.namespace).
IDENTITY = (("POD_NAMESPACE", "ISTIO_NAMESPACE"), ("SERVICE_ACCOUNT",))
VERB_WIDTH = 14  # "would install" and "would replace" are 13 letters: one space at least


class OnboardError(ValueError):
    """Input that cannot be installed; the message names the file (and line or key)."""


@dataclasses.dataclass(frozen=True)
class Checked:
    """The result of :func:`check_files`: ``errors`` (nothing may be installed when any),
    ``warnings`` and ``notes`` (worth reading, not fatal), the parsed ``hosts`` entries."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    hosts: tuple[HostEntry, ...]
    failed: frozenset[str] = frozenset()  # names of the files with an error


def check_files(
    files: Mapping[str, bytes | None],
    source: str,
    now: float,
    hosts_needed: bool = True,
    hosts_file: str = "/etc/hosts",
    skip: Collection[str] = (),
) -> Checked:
    """Check the five files; ``files`` maps each name of ALL_FILES to its content (None:
    missing), ``source`` is the directory they came from (for messages). ``hosts_needed``
    False: the hosts file is not used (``--no-hosts``) and is not checked. ``hosts_file``:
    the file the entries go to (for messages). ``skip``: names already reported (unreadable:
    one error per file)."""
    errors: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    failed: set[str] = set(skip)
    hosts: tuple[HostEntry, ...] = ()
    for name in ALL_FILES:
        data = files.get(name)
        where = f"{source.rstrip('/')}/{name}"
        if name in skip or (name == HOSTS and not hosts_needed):
            continue
        before = len(errors)
        if data is None:
            errors.append(f"{where}: missing; {REDO} (all five files are needed)")
        else:
            found, hosts = _check_one(name, data, where, now, hosts_file)
            errors += found.errors
            warnings += found.warnings
            notes += found.notes
        if len(errors) > before:
            failed.add(name)
    return Checked(tuple(errors), tuple(warnings), tuple(notes), hosts, frozenset(failed))


def _check_one(
    name: str, data: bytes, where: str, now: float, hosts_file: str
) -> tuple[Checked, tuple[HostEntry, ...]]:
    errors: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    hosts: tuple[HostEntry, ...] = ()
    try:
        if name == ROOT_CERT:
            warnings += check_root_cert(data, where, now)
        else:
            text = data.decode("utf-8")
            if name == CLUSTER_ENV:
                errors += check_cluster_env(text, where)
            elif name == MESH:
                check_mesh(text, where)
            elif name == TOKEN:
                token_warnings, token_notes = check_token(text, where, now)
                warnings += token_warnings
                notes += token_notes
            else:
                hosts, bad = hosts_lines(text, where)
                errors += bad
                if not hosts and not bad:
                    warnings.append(
                        f"{where}: no entries (istioctl found no gateway IP): {hosts_file} is "
                        "left as it is; istiod's name must resolve some other way, or re-run "
                        "istioctl with --ingressIP"
                    )
    except UnicodeDecodeError:
        errors.append(f"{where}: not UTF-8 text; {REDO}")
    except OnboardError as exc:
        errors.append(str(exc))
    return Checked(tuple(errors), tuple(warnings), tuple(notes), ()), hosts


def _check_settings(
    values: Mapping[str, str], where: str, lines: Mapping[str, int]
) -> list[str]:
    """Each key vmagent reads, parsed by its setting's own parser (vmagent.config): one
    error per bad value."""
    parsers = {env_key(f): f.metadata["parse"] for f in settings()}
    errors: list[str] = []
    for key, raw in values.items():
        parse = parsers.get(key)
        if parse is None:
            continue  # Istio's other keys (ISTIO_SERVICE, CANONICAL_*...) are passed along
        try:
            parse(raw)
        except ValueError as exc:
            line = f":{lines[key]}" if key in lines else ""
            errors.append(f"{where}{line}: {key}={raw!r}: {exc}")
    return errors


def check_cluster_env(text: str, where: str) -> list[str]:
    """One error per bad line or value, each naming its line and key, and one if the
    workload identity keys (IDENTITY) are missing. The shared reader
    (vmagent.config.parse_env_file) stops at its first error and reads line by line, so each
    line is read on its own (after as many empty lines as precede it: its number is kept)."""
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            found = parse_env_file("\n" * (number - 1) + line, where)
        except ConfigError as exc:
            errors.append(f"{exc}; {REDO}")
            continue
        values.update(found)
        lines.update(dict.fromkeys(found, number))
    errors += _check_settings(values, where, lines)
    missing = [key for keys in IDENTITY if not set(keys) & values.keys() for key in keys[:1]]
    if not errors and missing:
        what = "no settings at all (empty)" if not values else f"no {', no '.join(missing)}"
        errors.append(
            f"{where}: {what}: istioctl always writes {' and '.join(missing)} (the workload "
            f"identity its certificate names); {REDO}"
        )
    if "PROXY_CONFIG" in values:
        try:
            parse_proxy_config_env(values["PROXY_CONFIG"], f"{where}: PROXY_CONFIG")
        except ProxyConfigError as exc:
            errors.append(str(exc))
    return errors


def check_mesh(text: str, where: str) -> None:
    """OnboardError if mesh.yaml is not a MeshConfig vmagent can use (vmagent.proxyconfig)."""
    try:
        config = parse_mesh_config(text, where)
    except ProxyConfigError as exc:
        raise OnboardError(f"{exc}; {REDO}") from None
    metadata = config.get("proxyMetadata") or {}
    errors = _check_settings(metadata, f"{where}: defaultConfig.proxyMetadata", {})
    if errors:
        raise OnboardError("\n".join(errors))


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


def missing_identity(
    sources: Mapping[str, str], values: Mapping[str, str], where: str
) -> list[str]:
    """An error when the loaded configuration (``sources``: key -> where its value came from,
    ``"default"`` when nothing set it; ``values``: key -> raw value) has no workload namespace
    or service account. ``vmagent run`` would not refuse it: it would ask for the identity of
    namespace ``default``, service account ``default`` (vmagent.config.Config.namespace),
    which is not the workload the token was made for. istioctl always writes both keys, so
    an empty or truncated ``cluster.env`` (``where``) is the likely cause."""
    missing = [
        " or ".join(keys) for keys in IDENTITY
        if not any(sources.get(key, "default") != "default" and values.get(key) for key in keys)
    ]
    if not missing:
        return []
    return [
        f"{where}: {'; '.join(missing)}: missing or empty in cluster.env and mesh.yaml "
        "(istioctl always writes the WorkloadGroup's namespace and service account); vmagent "
        f"run would use 'default', not the identity the token was made for; {REDO}"
    ]


def row(verb: str, text: str) -> str:
    """One action line: the verb in a column of VERB_WIDTH, then ``text`` (never run
    together: ``would install /etc/vmagent/cluster.env``)."""
    return f"{verb:<{VERB_WIDTH - 1}} {text}"


def next_steps(running: bool) -> list[str]:
    """The closing lines after an install. The package enables the unit; ``running`` (its
    status socket answers): restart it to read the new files, else start it. ``--no-block``:
    with Type=notify, ``systemctl start`` would wait until the agent is ready (up to the
    unit's 5 min TimeoutStartSec); ``vmagent status --wait`` bounds and shows that wait."""
    verb = "restart" if running else "start"
    why = "it is running: a restart reads the new files" if running else "it is not running"
    return [
        f"next: sudo systemctl {verb} --no-block vmagent   ({why})",
        "      vmagent status --wait 120",
    ]


def _date(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min" if seconds >= 60 else f"{int(seconds)} s"


def _days(seconds: float) -> str:
    return f"{int(seconds // 86400)} days"
