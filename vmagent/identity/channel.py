"""The gRPC channel to istiod (CA and xDS alike), and failures explained in words a user can act on.

Istio's rules for a target (``pkg/istio-agent/agent.go``, ``security/pkg/nodeagent/caclient``):
plaintext only for ``:15010``; TLS server name ``ISTIOD_SAN``, else the address's host (a host
containing ``localhost`` means istiod's own name); root certificate ``CA_ROOT_CA`` (CA only),
else ``XDS_ROOT_CA``, else ``<VMAGENT_CONFIG_DIR>/root-cert.pem`` (``SYSTEM``: the OS store).

gRPC's C core reports failures as one line of OpenSSL and resolver jargon (and logs it to stderr
on its own: see ``vmagent/__init__.py``, which turns that off). :func:`explain` turns the status
details into a :class:`Failure` whose ``kind`` the callers act on (a refused client certificate
makes the agent re-issue with the platform credential) and whose ``message`` says what to fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import grpc.aio
from cryptography import x509

from vmagent.config import Config
from vmagent.identity.certs import ChainError, parse_certs

DEFAULT_SERVER_NAME = "istiod.istio-system.svc"
SYSTEM = "SYSTEM"
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", -1),
    ("grpc.http2.lookahead_bytes", 1 << 20),
)

# Failure kinds.
NAME = "name-mismatch"
ROOT = "wrong-root"
CLIENT_CERT = "client-cert-refused"
CLOSED = "closed-during-handshake"  # possibly our client certificate: caller confirms
DNS = "unresolvable"
TIMEOUT = "timeout"
OTHER = "other"

_NAME_MARKS = ("Hostname Verification Check failed", "is not in peer certificate", "Peer name")
_ROOT_MARKS = (
    "CERTIFICATE_VERIFY_FAILED",
    "certificate signature failure",
    "unable to get local issuer",
    "self signed certificate",
    "self-signed certificate",
    "certificate verify failed",
    "BAD_SIGNATURE",
)
# TLS alerts a server sends when it does not accept the client certificate (RFC 8446 §6.2).
_CLIENT_CERT_MARKS = (
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_DECRYPT_ERROR",
)
_CLOSED_MARKS = ("Socket closed", "Connection reset", "connection reset", "Broken pipe", "EOF")
_DNS_MARKS = (
    "errors resolving",
    "DNS resolution failed",
    "Domain name not found",
    "hostname lookup",
)


class CaError(Exception):
    """A call to the CA failed; ``code`` is the gRPC status (None: no answer), ``kind`` one of
    this module's failure kinds."""

    def __init__(
        self, message: str, code: grpc.StatusCode | None = None, kind: str = OTHER
    ) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class CaTarget:
    address: str
    server_name: str
    plaintext: bool
    root: str  # a PEM file path, or SYSTEM for the OS trust store
    root_setting: str = "root-cert.pem"  # what names the root: a variable or the default file
    name_setting: str = ""  # ISTIOD_SAN when it set the server name, else ""
    role: str = "CA"  # what the address is for, in messages: "CA" or "discovery"
    address_setting: str = "CA_ADDR"  # what set the address, in messages


def host_of(address: str) -> str:
    """``host:port``, ``[v6]:port`` or a bare host -> the host."""
    if address.startswith("["):
        return address[1 : address.find("]")]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def make_target(
    address: str,
    istiod_san: str,
    roots: tuple[tuple[str, str], ...],
    config_dir: str,
    *,
    role: str = "CA",
    address_setting: str = "CA_ADDR",
) -> CaTarget:
    """``roots``: (variable name, value) in priority order; the first non-empty one wins.
    ``role`` and ``address_setting`` only word the errors (``the CA address ... (CA_ADDR)``)."""
    host = host_of(address)
    server_name = istiod_san or (DEFAULT_SERVER_NAME if "localhost" in host else host)
    for name, value in roots:
        if value:
            root, setting = value, name
            break
    else:
        root, setting = str(Path(config_dir) / "root-cert.pem"), "root-cert.pem"
    return CaTarget(
        address,
        server_name,
        address.endswith(":15010"),
        root,
        setting,
        "ISTIOD_SAN" if istiod_san else "",
        role,
        address_setting,
    )


def root_choices(config: Config, *keys: str) -> tuple[tuple[str, str], ...]:
    """(label, path) for :func:`make_target` from the settings ``keys`` (e.g. ``CA_ROOT_CA``),
    labelled by the variable only when the user set it (a default reads "root-cert.pem")."""
    choices = []
    for key in keys:
        source = config.sources.get(key, "default")
        label = "root-cert.pem" if source.startswith("default") else key
        choices.append((label, str(getattr(config, key.lower()))))
    return tuple(choices)


def load_roots(target: CaTarget) -> tuple[bytes | None, list[x509.Certificate] | None]:
    """PEM and parsed root certs, or (None, None) for the OS trust store; CaError naming the
    file when it cannot be read or parsed."""
    if target.root.upper() == SYSTEM:
        return None, None
    try:
        pem = Path(target.root).read_bytes()
        return pem, parse_certs(pem, f"root certificate {target.root} ({target.root_setting})")
    except OSError as exc:
        raise CaError(
            f"cannot read the root certificate {target.root} ({target.root_setting}): "
            f"{exc.strerror}; copy root-cert.pem from the onboarding files there",
            kind=ROOT,
        ) from None
    except ChainError as exc:
        raise CaError(str(exc), kind=ROOT) from None


def open_channel(target: CaTarget, client_cert: tuple[bytes, bytes] | None) -> grpc.aio.Channel:
    """A channel to the CA or istiod: plaintext only for :15010 targets, else TLS verified
    against the target's root with the expected server name, presenting ``client_cert``
    (key PEM, chain PEM)."""
    if target.plaintext:
        return grpc.aio.insecure_channel(target.address, options=CHANNEL_OPTIONS)
    root_pem, _ = load_roots(target)
    key, chain = client_cert if client_cert else (None, None)
    credentials = grpc.ssl_channel_credentials(root_pem, key, chain)
    options = (*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", target.server_name))
    return grpc.aio.secure_channel(target.address, credentials, options=options)


@dataclasses.dataclass(frozen=True)
class Failure:
    kind: str
    message: str


def explain(
    target: CaTarget,
    code: grpc.StatusCode | None,
    details: str,
    *,
    client_cert_sent: bool,
    timeout: float | None = None,
) -> Failure:
    """Classify a failed call to ``target`` (pure). ``details`` is the gRPC status text;
    ``timeout`` the seconds waited when the call timed out (``code`` DEADLINE_EXCEEDED or None).
    """
    where = target.address
    if timeout is not None or code == grpc.StatusCode.DEADLINE_EXCEEDED:
        waited = f" after {timeout:g} s" if timeout is not None else ""
        return Failure(
            TIMEOUT,
            f"{where}: timed out{waited} (no answer; is the address right "
            "and reachable from this VM?)",
        )
    text = details or (code.name if code else "no details")
    if any(mark in text for mark in _DNS_MARKS):
        # The name is Kubernetes-internal (istiod.istio-system.svc): the VM cannot resolve
        # it until the onboarding `hosts` line is in /etc/hosts. Worded so the address, not
        # the CA, is what failed.
        host = host_of(where)
        return Failure(
            DNS,
            f"cannot resolve the {target.role} address {host!r} ({target.address_setting}): "
            f"add the line for {host} from the onboarding `hosts` file (istioctl x workload "
            "entry configure) to /etc/hosts, or use an address this VM can resolve "
            f"({text})",
        )
    if any(mark in text for mark in _NAME_MARKS):
        origin = "set by ISTIOD_SAN" if target.name_setting else "the address's host"
        return Failure(
            NAME,
            f"{where}: the server's TLS certificate does not name {target.server_name!r} (the "
            f"expected name, {origin}); set ISTIOD_SAN to a name in istiod's certificate "
            "(usually istiod.<its namespace>.svc, e.g. istiod.istio-system.svc)",
        )
    if any(mark in text for mark in _CLIENT_CERT_MARKS):
        return Failure(
            CLIENT_CERT,
            f"{where}: the TLS handshake was refused because of our client certificate (it is "
            "not trusted there: issued under another root?)",
        )
    if any(mark in text for mark in _ROOT_MARKS):
        return Failure(
            ROOT,
            f"{where}: the server's certificate is not signed by the root certificate "
            f"{target.root} ({target.root_setting}): is this root-cert.pem from this mesh's "
            "onboarding files?",
        )
    if (
        client_cert_sent
        and code == grpc.StatusCode.UNAVAILABLE
        and any(mark in text for mark in _CLOSED_MARKS)
    ):
        return Failure(CLOSED, f"{where}: connection closed during the TLS handshake ({text})")
    name = code.name if code else "error"
    return Failure(OTHER, f"{where}: {name}: {text}")
