"""The certificate manager: the asyncio shell around the rotation schedule.

It loads a valid cert from disk at start, renews when :func:`rotation.next_action` says so
(new key, CSR, CA call, reply checks, atomic files), keeps serving the old cert whenever a
renewal fails, and tells subscribers (SDS) about every new cert.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from vmagent.config import Config
from vmagent.identity import rotation
from vmagent.identity.ca_client import CaClient, CaError, ca_headers
from vmagent.identity.certs import CertBundle, ChainError, bundle_from_reply
from vmagent.identity.csr import (
    KeySpecError,
    build_csr,
    config_spiffe_id,
    key_spec,
    new_private_key,
    private_key_pem,
)
from vmagent.identity.detect import Detection, choose_provider
from vmagent.identity.providers import CredentialProvider
from vmagent.identity.store import CertStore, StoreError
from vmagent.identity.tokens import CredentialError

log = logging.getLogger(__name__)

Subscriber = Callable[[CertBundle], None]
MAX_SLEEP = 60.0  # re-read the clock at least this often (suspend, clock steps)
CLIENT_CERT_MARGIN = 1.0  # a cert this close to expiry is not presented to the CA


class IdentityError(Exception):
    """A renewal failed; the old certificate (if any) is still in service."""


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class CertificateManager:
    def __init__(
        self,
        config: Config,
        provider: CredentialProvider,
        detection: Detection,
        ca: CaClient,
        store: CertStore,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = key_spec(config)
        self.identity = config_spiffe_id(config)
        self.provider = provider
        self.detection = detection
        self.ca = ca
        self.store = store
        self.schedule = rotation.Schedule(
            config.secret_grace_period_ratio, config.secret_grace_period_ratio_jitter
        )
        self.state = rotation.RotationState()
        self.current: CertBundle | None = None
        self.last_attempt: float | None = None
        self._clock = clock
        self._rng = rng or random.Random()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(bundle)`` on every new cert; returns the unsubscribe function."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def _install(self, bundle: CertBundle) -> None:
        self.current = bundle
        self.state = rotation.on_issued(
            self.state, bundle.created, bundle.not_after, self.schedule, self._rng.uniform(-1, 1)
        )
        for subscriber in list(self._subscribers):
            try:
                subscriber(bundle)
            except Exception:
                log.exception("certificate subscriber failed")
        self.store.save_status(self.status())

    def load_from_disk(self) -> CertBundle | None:
        """Start from a valid stored cert (a reboot does not need the bootstrap token)."""
        bundle = self.store.load(self._clock())
        if bundle is not None:
            log.info(
                "using stored certificate %s serial %s valid until %s",
                bundle.spiffe_id,
                bundle.serial_hex(),
                _iso(bundle.not_after),
            )
            self._install(bundle)
        return bundle

    def client_cert(self, now: float) -> tuple[bytes, bytes] | None:
        bundle = self.current
        if bundle is None or bundle.not_after <= now + CLIENT_CERT_MARGIN:
            return None
        return bundle.key_pem, bundle.chain_pem

    async def _attempt(self) -> CertBundle:
        now = self._clock()
        client_cert = self.client_cert(now)
        token: str | None = None
        try:
            token = (await self.provider.fetch(now)).token
        except CredentialError as exc:
            if client_cert is None:
                raise
            log.info("no platform credential (%s); renewing with the workload certificate", exc)
        key = await asyncio.to_thread(new_private_key, self.spec)
        chain = await self.ca.sign(build_csr(key, self.identity), token, client_cert)
        bundle = bundle_from_reply(
            chain, key, private_key_pem(key), self.ca.trusted_roots(), self._clock()
        )
        if self.identity not in bundle.spiffe_ids:
            log.warning("CA issued %s, configured identity is %s", bundle.spiffe_id, self.identity)
        self.store.save(bundle)
        return bundle

    async def renew(self) -> CertBundle:
        """One renewal; IdentityError (old cert kept) on any failure."""
        self.last_attempt = self._clock()
        try:
            bundle = await self._attempt()
        except (CredentialError, CaError, ChainError, StoreError, KeySpecError) as exc:
            message = f"{type(exc).__name__}: {exc}" if isinstance(exc, ChainError) else str(exc)
            self.state = rotation.on_failure(
                self.state, message, self._clock(), self.schedule, self._rng.uniform(-1, 1)
            )
            kept = "; keeping the current certificate" if self.current else ""
            log.error("certificate renewal failed: %s%s", message, kept)
            self.store.save_status(self.status())
            raise IdentityError(message) from None
        log.info(
            "new certificate %s serial %s valid until %s",
            bundle.spiffe_id,
            bundle.serial_hex(),
            _iso(bundle.not_after),
        )
        self._install(bundle)
        return bundle

    async def fetch_once(self, force: bool = False) -> tuple[CertBundle, bool]:
        """``vmagent identity fetch``: keep a stored cert before its rotation point, else
        renew. Returns (bundle, renewed); IdentityError if renewal fails."""
        stored = self.load_from_disk()
        if stored is not None and not force:
            due = rotation.rotation_time(stored.created, stored.not_after, self.schedule, 0.0)
            if self._clock() < due:
                return stored, False
        return await self.renew(), True

    async def run(self) -> None:
        """Keep the certificate rotated for ever (cancel to stop)."""
        if self.current is None:
            self.load_from_disk()
        while True:
            action = rotation.next_action(self.state, self._clock())
            if isinstance(action, rotation.Wait):
                await asyncio.sleep(min(MAX_SLEEP, max(0.0, action.until - self._clock())))
                continue
            log.debug("renewing: %s", action.reason)
            with contextlib.suppress(IdentityError):
                await self.renew()

    def status(self) -> dict[str, Any]:
        bundle = self.current
        return {
            "source": self.detection.source,
            "source_reason": self.detection.reason,
            "spiffe_id": bundle.spiffe_id if bundle else None,
            "serial": bundle.serial_hex() if bundle else None,
            "not_after": _iso(bundle.not_after) if bundle else None,
            "next_rotation": _iso(self.state.next_attempt()),
            "last_attempt": _iso(self.last_attempt),
            "last_error": self.state.last_error or None,
            "failures": self.state.failures,
        }


async def create_manager(
    config: Config, environ: Mapping[str, str], *, clock: Callable[[], float] = time.time
) -> CertificateManager:
    """A manager for ``config``: credential source detected, CA client, certificate store.
    ``environ`` supplies Istio's dynamic ``CA_HEADER_*`` variables."""
    provider, detection = await choose_provider(config)
    ca = CaClient(config, ca_headers(environ))
    return CertificateManager(
        config, provider, detection, ca, CertStore(config.output_certs), clock=clock
    )
