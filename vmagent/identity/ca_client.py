"""Client for Istio's ``IstioCertificateService/CreateCertificate``, called as Istio's agent does.

Each signing dials a fresh channel (Istio re-dials after any error, so a rotated root or a new
client cert takes effect): TLS verified against the CA root, the current workload cert as
client certificate when one is valid, metadata ``clusterid`` and ``authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import grpc
import grpc.aio
from cryptography import x509

from vmagent._proto import ca_pb2, ca_pb2_grpc
from vmagent.config import Config
from vmagent.identity.certs import ChainError, parse_certs

log = logging.getLogger(__name__)

RETRIABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
    }
)
MAX_ATTEMPTS = 5
BACKOFF_BASE = 0.1
BACKOFF_JITTER = 0.1
CALL_TIMEOUT = 30.0
DEFAULT_SERVER_NAME = "istiod.istio-system.svc"
SYSTEM = "SYSTEM"
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", -1),
    ("grpc.http2.lookahead_bytes", 1 << 20),
)


class CaError(Exception):
    """Signing failed; ``code`` is the gRPC status when the CA answered."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class CaTarget:
    address: str
    server_name: str
    plaintext: bool
    root: str  # a PEM file path, or SYSTEM for the OS trust store


def _host(address: str) -> str:
    if address.startswith("["):
        return address[1 : address.find("]")]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def ca_target(config: Config) -> CaTarget:
    """Istio's rules: plaintext only for ``:15010``; server name ``ISTIOD_SAN``, else the host
    (a host containing ``localhost`` becomes istiod's name); root ``CA_ROOT_CA``, else
    ``XDS_ROOT_CA``, else ``<VMAGENT_CONFIG_DIR>/root-cert.pem``."""
    address = config.ca_address
    host = _host(address)
    server_name = config.istiod_san or (DEFAULT_SERVER_NAME if "localhost" in host else host)
    root = config.ca_root_ca or config.xds_root_ca
    if not root:
        root = str(Path(config.vmagent_config_dir) / "root-cert.pem")
    return CaTarget(address, server_name, address.endswith(":15010"), root)


def ca_headers(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``CA_HEADER_<Name>=<v>`` variables become ``<name>: <v>`` metadata (Istio's extension)."""
    prefix = "CA_HEADER_"
    return tuple(
        sorted(
            (k[len(prefix) :].lower(), v)
            for k, v in environ.items()
            if k.startswith(prefix) and len(k) > len(prefix)
        )
    )


def request_metadata(
    cluster_id: str, token: str | None, extra: Sequence[tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    metadata = [("clusterid", cluster_id)]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    return (*metadata, *extra)


def build_request(
    csr_pem: bytes, ttl_seconds: int, cert_signer: str
) -> ca_pb2.IstioCertificateRequest:
    request = ca_pb2.IstioCertificateRequest(
        csr=csr_pem.decode("ascii"), validity_duration=ttl_seconds
    )
    request.metadata.update({"CertSigner": cert_signer})
    return request


def load_roots(target: CaTarget) -> tuple[bytes | None, list[x509.Certificate] | None]:
    """PEM and parsed root certs, or (None, None) for the OS trust store."""
    if target.root.upper() == SYSTEM:
        return None, None
    try:
        pem = Path(target.root).read_bytes()
        return pem, parse_certs(pem, f"CA root {target.root}")
    except OSError as exc:
        raise CaError(f"cannot read CA root certificate {target.root}: {exc.strerror}") from None
    except ChainError as exc:
        raise CaError(str(exc)) from None


def open_channel(target: CaTarget, client_cert: tuple[bytes, bytes] | None) -> grpc.aio.Channel:
    """A channel to the CA or istiod: plaintext only for :15010 targets, else TLS verified
    against the target's root with the expected server name, presenting ``client_cert``."""
    if target.plaintext:
        return grpc.aio.insecure_channel(target.address, options=CHANNEL_OPTIONS)
    root_pem, _ = load_roots(target)
    key, chain = client_cert if client_cert else (None, None)
    credentials = grpc.ssl_channel_credentials(root_pem, key, chain)
    options = (*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", target.server_name))
    return grpc.aio.secure_channel(target.address, credentials, options=options)


class CaClient:
    def __init__(
        self,
        config: Config,
        extra_headers: Sequence[tuple[str, str]] = (),
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.target = ca_target(config)
        self.cluster_id = config.istio_meta_cluster_id
        self.ttl = int(config.secret_ttl)
        self.cert_signer = config.istio_meta_cert_signer
        self.extra_headers = tuple(extra_headers)
        self._sleep = sleep
        self._rng = rng or random.Random()

    def trusted_roots(self) -> list[x509.Certificate] | None:
        return load_roots(self.target)[1]

    async def _call_once(
        self,
        request: ca_pb2.IstioCertificateRequest,
        metadata: tuple[tuple[str, str], ...],
        client_cert: tuple[bytes, bytes] | None,
    ) -> list[str]:
        async with open_channel(self.target, client_cert) as channel:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
            response = await stub.CreateCertificate(
                request, metadata=metadata, timeout=CALL_TIMEOUT
            )
        return list(response.cert_chain)

    async def sign(
        self, csr_pem: bytes, token: str | None, client_cert: tuple[bytes, bytes] | None
    ) -> list[str]:
        """The CA's ``cert_chain`` for the CSR. ``client_cert`` is (key PEM, chain PEM)."""
        request = build_request(csr_pem, self.ttl, self.cert_signer)
        metadata = request_metadata(self.cluster_id, token, self.extra_headers)
        auth = "client certificate" if client_cert else "bearer token" if token else "nothing"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return await self._call_once(request, metadata, client_cert)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code not in RETRIABLE or attempt == MAX_ATTEMPTS:
                    raise CaError(
                        f"CA {self.target.address} (authenticating with {auth}): "
                        f"{code.name}: {details}",
                        code,
                    ) from None
                delay = BACKOFF_BASE * 2 ** (attempt - 1)
                delay *= 1 + BACKOFF_JITTER * self._rng.uniform(-1, 1)
                log.info(
                    "CA %s: %s (%s), retry %d in %.2fs",
                    self.target.address,
                    code.name,
                    details,
                    attempt,
                    delay,
                )
                await self._sleep(delay)
        raise AssertionError("unreachable")
