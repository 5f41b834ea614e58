"""Client for Istio's ``IstioCertificateService/CreateCertificate``, called as Istio's agent does.

Each signing dials a fresh channel (Istio re-dials after any error, so a rotated root or a new
client cert takes effect): TLS verified against the CA root, the current workload cert as
client certificate when one is valid, metadata ``clusterid`` and ``authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import grpc
import grpc.aio
from cryptography import x509

from vmagent._proto import ca_pb2, ca_pb2_grpc
from vmagent.config import Config
from vmagent.identity.channel import (
    CLIENT_CERT,
    CLOSED,
    DEFAULT_SERVER_NAME,
    DNS,
    NAME,
    ROOT,
    SYSTEM,
    CaError,
    CaTarget,
    explain,
    load_roots,
    make_target,
    open_channel,
    root_choices,
)

__all__ = [
    "DEFAULT_SERVER_NAME",
    "SYSTEM",
    "CaClient",
    "CaError",
    "CaTarget",
    "ca_headers",
    "ca_target",
    "load_roots",
    "open_channel",
    "request_metadata",
]

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
# Failures that another attempt with the same settings cannot fix.
PERMANENT_KINDS = frozenset({NAME, ROOT, CLIENT_CERT, CLOSED})
MAX_ATTEMPTS = 5
BACKOFF_BASE = 0.1
BACKOFF_JITTER = 0.1
CALL_TIMEOUT = 30.0


def ca_target(config: Config) -> CaTarget:
    """Istio's rules (see :mod:`vmagent.identity.channel`); the root is ``CA_ROOT_CA``, else
    ``XDS_ROOT_CA``, else ``<VMAGENT_CONFIG_DIR>/root-cert.pem``."""
    # CA_ADDR's source reads "... discoveryAddress" when the mesh config's address filled it.
    derived = "discoveryAddress" in config.sources.get("CA_ADDR", "") or not config.ca_addr
    return make_target(
        config.ca_address,
        config.istiod_san,
        root_choices(config, "CA_ROOT_CA", "XDS_ROOT_CA"),
        config.vmagent_config_dir,
        role="CA",
        address_setting="CA_ADDR unset: discoveryAddress" if derived else "CA_ADDR",
    )


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
        """The configured roots, read now (None: the OS trust store); CaError naming the file."""
        return load_roots(self.target)[1]

    def trusted_root_pem(self) -> bytes | None:
        """The configured root file's bytes, read now (None: the OS trust store)."""
        if self.target.root.upper() == SYSTEM:
            return None
        try:
            return Path(self.target.root).read_bytes()
        except OSError as exc:
            raise CaError(f"cannot read {self.target.root}: {exc.strerror}", kind=ROOT) from None

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
                failure = explain(
                    self.target,
                    code,
                    details,
                    client_cert_sent=client_cert is not None,
                    timeout=CALL_TIMEOUT if code == grpc.StatusCode.DEADLINE_EXCEEDED else None,
                )
                last = attempt == MAX_ATTEMPTS or failure.kind in PERMANENT_KINDS
                # "CA <address>: ..."; a DNS failure already names "the CA address".
                what = failure.message if failure.kind == DNS else f"CA {failure.message}"
                if code not in RETRIABLE or last:
                    message = f"{what} (authenticating with {auth})"
                    raise CaError(message, code, failure.kind) from None
                delay = BACKOFF_BASE * 2 ** (attempt - 1)
                delay *= 1 + BACKOFF_JITTER * self._rng.uniform(-1, 1)
                log.info("%s; retry %d in %.2fs", what, attempt, delay)
                await self._sleep(delay)
        raise AssertionError("unreachable")
