"""Envoy's Secret Discovery Service (state of the world) on a Unix socket.

Serves ``default`` (tls_certificate: chain + key) and ``ROOTCA`` (validation_context: the CA
reply's root), as Istio's agent does; pushes on every rotation to the streams that asked for a
secret whose content changed. Unknown names fail the request with NOT_FOUND, and a stream
asking before the first certificate waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from vmagent.config import Config
from vmagent.identity.certs import CertBundle

log = logging.getLogger(__name__)

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
DEFAULT = "default"
ROOTCA = "ROOTCA"
NAMES = (DEFAULT, ROOTCA)
SOCKET_NAME = "sds.sock"


class CertSource(Protocol):
    current: CertBundle | None

    def subscribe(self, subscriber: Callable[[CertBundle], None]) -> Callable[[], None]: ...


def sds_socket_path(config: Config) -> Path:
    return Path(config.vmagent_run_dir) / SOCKET_NAME


class UnknownSecret(KeyError):
    pass


def secret_content(name: str, bundle: CertBundle) -> bytes:
    if name == DEFAULT:
        return bundle.chain_pem + bundle.key_pem
    if name == ROOTCA:
        return bundle.root_pem
    raise UnknownSecret(name)


def make_secret(name: str, bundle: CertBundle) -> Any:
    secret = secret_pb2.Secret(name=name)
    if name == DEFAULT:
        secret.tls_certificate.certificate_chain.inline_bytes = bundle.chain_pem
        secret.tls_certificate.private_key.inline_bytes = bundle.key_pem
    elif name == ROOTCA:
        secret.validation_context.trusted_ca.inline_bytes = bundle.root_pem
    else:
        raise UnknownSecret(name)
    return secret


def check_names(names: Sequence[str]) -> str | None:
    """An error message if the request names nothing or something unknown."""
    if not names:
        return "SDS request names no secret; this server serves 'default' and 'ROOTCA'"
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        return f"unknown secret {unknown[0]!r}; this server serves 'default' and 'ROOTCA'"
    return None


def make_response(names: Sequence[str], bundle: CertBundle, version: str) -> Any:
    response = discovery_pb2.DiscoveryResponse(
        version_info=version, type_url=SECRET_TYPE, nonce=str(uuid.uuid4())
    )
    for name in names:
        response.resources.add().Pack(make_secret(name, bundle))
    return response


def version_of(bundle: CertBundle) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bundle.created))
    return f"{stamp}/{bundle.serial_hex()}"


class SdsService(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, source: CertSource) -> None:
        self.source = source
        self._queues: set[asyncio.Queue[Any]] = set()  # one per open StreamSecrets

    def end_streams(self) -> None:
        """End every open stream with status OK: Envoy logs that at debug level only (its
        ``grpc_stream.h`` ``logClose``), whereas a stream cut by a closing connection is a
        warning (``closed: 13, upstream_reset_after_response_started``)."""
        for queue in list(self._queues):
            queue.put_nowait(None)

    async def FetchSecrets(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        names = list(request.resource_names)
        error = check_names(names)
        if error:
            await context.abort(grpc.StatusCode.NOT_FOUND, error)
        bundle = self.source.current
        if bundle is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no workload certificate yet")
        return make_response(names, bundle, version_of(bundle))

    async def StreamSecrets(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    queue.put_nowait(request)
            finally:
                queue.put_nowait(None)

        reader = asyncio.ensure_future(read_requests())
        self._queues.add(queue)
        unsubscribe = self.source.subscribe(queue.put_nowait)
        names: list[str] = []
        sent: dict[str, bytes] = {}
        last_nonce = ""
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, CertBundle):
                    bundle: CertBundle | None = item
                else:
                    if item.HasField("error_detail"):
                        log.warning(
                            "Envoy rejected secrets %s: %s",
                            list(item.resource_names),
                            item.error_detail.message,
                        )
                    if item.response_nonce and item.response_nonce != last_nonce:
                        continue  # stale
                    error = check_names(list(item.resource_names))
                    if error:
                        await context.abort(grpc.StatusCode.NOT_FOUND, error)
                    if list(item.resource_names) != names:
                        names, sent = list(item.resource_names), {}
                    bundle = self.source.current
                if bundle is None or not names:
                    continue
                content = {name: secret_content(name, bundle) for name in names}
                if content == sent:
                    continue
                response = make_response(names, bundle, version_of(bundle))
                sent, last_nonce = content, response.nonce
                log.debug("SDS push %s version %s", names, response.version_info)
                yield response
        finally:
            self._queues.discard(queue)
            unsubscribe()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


class SdsServer:
    """The SDS gRPC server on ``path`` (stale socket removed, directory 0750, socket 0660)."""

    def __init__(self, source: CertSource, path: str | Path) -> None:
        self.path = Path(path)
        self.service = SdsService(source)
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = grpc.aio.server()
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self.service, self._server)
        self._server.add_insecure_port(f"unix:{self.path}")
        await self._server.start()
        os.chmod(self.path, 0o660)
        log.info("SDS listening on %s", self.path)

    async def stop(self) -> None:
        """Stop taking streams, then end the open ones with status OK (quiet in Envoy's log;
        see :meth:`SdsService.end_streams`); returns once they are closed (at most 1 s)."""
        server, self._server = self._server, None
        if server is not None:
            stopping = asyncio.ensure_future(server.stop(1))
            await asyncio.sleep(0)  # shutdown started: Envoy cannot open a new stream now
            self.service.end_streams()
            await stopping
