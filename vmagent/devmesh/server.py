"""The development CA: ``istio.v1.auth.IstioCertificateService`` over TLS.

Authentication as istiod orders it: a verified client certificate (its SPIFFE ID is the
caller), else the bearer credential (:mod:`vmagent.devmesh.verify`). The issued SAN is always
the authenticated caller's identity, never what the CSR asks for.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509

from vmagent._proto import ca_pb2, ca_pb2_grpc
from vmagent.devmesh.authority import Authority, SigningError
from vmagent.devmesh.settings import DevCaSettings
from vmagent.devmesh.tlsfront import TlsFront
from vmagent.devmesh.verify import NotMapped, Verifier
from vmagent.identity.certs import spiffe_ids
from vmagent.identity.csr import spiffe_id
from vmagent.identity.store import atomic_write
from vmagent.identity.tokens import CredentialError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Issued:
    """One answered request, for logs and tests: how the caller authenticated, what it got."""

    auth: str  # "client-certificate", or the credential source (JWT, AWS, ...)
    spiffe_id: str
    cluster_id: str


class CaService(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(
        self,
        authority: Authority,
        verifier: Verifier,
        trust_domain: str,
        front: TlsFront | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.authority = authority
        self.verifier = verifier
        self.trust_domain = trust_domain
        self.front = front
        self.clock = clock
        self.issued: collections.deque[Issued] = collections.deque(maxlen=1000)

    def _authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any], now: float
    ) -> tuple[str, str]:
        """(how, SPIFFE ID); raises CredentialError."""
        peer = self.front.peer_certificate(context.peer()) if self.front else None
        if peer is not None:
            ids = spiffe_ids(x509.load_der_x509_certificate(peer))
            if ids:
                return "client-certificate", ids[0]
        metadata = {k: v for k, v in context.invocation_metadata() or ()}
        authorization = str(metadata.get("authorization", ""))
        if not authorization.startswith("Bearer ") or not authorization[7:].strip():
            raise CredentialError("no client certificate and no bearer token")
        caller = self.verifier.verify(authorization[7:].strip(), now)
        log.info(
            "authenticated %s caller %s as %s/%s",
            caller.source,
            caller.detail,
            caller.namespace,
            caller.service_account,
        )
        return caller.source, spiffe_id(self.trust_domain, caller.namespace, caller.service_account)

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.IstioCertificateResponse:
        now = self.clock()
        try:
            how, identity = self._authenticate(context, now)
        except NotMapped as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except CredentialError as exc:
            log.info("request authenticate failure: %s", exc)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"request authenticate failure: {exc}"
            )
        try:
            chain = self.authority.sign_csr(request.csr, identity, request.validity_duration, now)
        except SigningError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
        self.issued.append(Issued(how, identity, metadata.get("clusterid", "")))
        log.info("issued %s (authenticated by %s)", identity, how)
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)


def bind_error(address: str, what: str, flag: str, exc: OSError) -> str:
    """One line for a port that cannot be bound: the address, what wanted it, the flag that
    moves it (``--listen HOST:PORT``), and the reason (``Address already in use``)."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"cannot listen on {address} ({what}): {reason}; choose another with {flag}"


class DevCa:
    """The running dev CA: TLS front on ``listen``, gRPC on a loopback port behind it."""

    def __init__(
        self,
        settings: DevCaSettings,
        clock: Callable[[], float] = time.time,
        extra_services: Sequence[Callable[[grpc.aio.Server], None]] = (),
    ) -> None:
        """``extra_services`` add more servicers to the same gRPC server (``devmesh serve``
        adds ADS there, so CA and xDS share one TLS port like istiod's 15012)."""
        self.settings = settings
        self.extra_services = tuple(extra_services)
        self.authority = Authority.load_or_create(
            settings.directory, settings.trust_domain, clock()
        )
        self.service = CaService(
            self.authority, Verifier(settings, self.authority), settings.trust_domain, None, clock
        )
        self._server: grpc.aio.Server | None = None
        self._front: TlsFront | None = None
        self.port = 0

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> int:
        self._server = grpc.aio.server()
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self.service, self._server
        )
        for add in self.extra_services:
            add(self._server)
        backend = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        folder = Path(self.settings.directory)
        key_pem, chain_pem = self.authority.serving_credentials(time.time())
        atomic_write(folder / "serving-key.pem", key_pem)
        atomic_write(folder / "serving-cert.pem", chain_pem)
        context = TlsFront.make_context(
            str(folder / "serving-cert.pem"),
            str(folder / "serving-key.pem"),
            self.authority.root_pem,
        )
        self._front = TlsFront(context, backend)
        self.service.front = self._front
        host, port = self.settings.listen.rsplit(":", 1)
        try:
            self.port = await self._front.start(host.strip("[]"), int(port))
        except OSError as exc:
            await self.stop()  # the gRPC server behind it too: nothing left for the GC
            raise OSError(
                bind_error(self.settings.listen, "devmesh CA + xDS", "--listen HOST:PORT", exc)
            ) from None

        log.info(
            "dev CA for trust domain %r listening on %s (root %s/root-cert.pem)",
            self.settings.trust_domain,
            self.address,
            self.settings.directory,
        )
        return self.port

    async def stop(self) -> None:
        if self._front is not None:
            await self._front.stop()
        if self._server is not None:
            await self._server.stop(1.0)  # in-flight CSRs finish; ADS streams ended already
