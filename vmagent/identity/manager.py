"""The certificate manager: the asyncio shell around the rotation schedule.

It loads a valid cert from disk at start, renews when :func:`rotation.next_action` says so
(new key, CSR, CA call, reply checks, atomic files), keeps serving the old cert whenever a
renewal fails, and tells subscribers (SDS) about every new cert.

A certificate that does not chain to the configured root (``root-cert.pem``, ``XDS_ROOT_CA``,
``CA_ROOT_CA``) is never presented: at start, and whenever that root file changes, such a cert
is discarded and a new one requested with the platform credential (re-onboarding to another
mesh, root rotation). A TLS handshake the CA refuses because of the client certificate is
reported as such and the CSR is sent again with the platform credential alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from vmagent.config import Config
from vmagent.identity import rotation
from vmagent.identity.ca_client import CaClient, CaError, ca_headers
from vmagent.identity.certs import (
    CertBundle,
    ChainError,
    bundle_from_reply,
    root_mismatch,
    trust_domain_of,
)
from vmagent.identity.channel import CLIENT_CERT, CLOSED
from vmagent.identity.csr import (
    KeySpecError,
    build_csr,
    config_spiffe_id,
    key_spec,
    new_private_key,
    private_key_pem,
    spiffe_id,
)
from vmagent.identity.detect import Detection, choose_provider
from vmagent.identity.providers import CredentialProvider
from vmagent.identity.store import CertStore, StoreError
from vmagent.identity.tokens import CredentialError

log = logging.getLogger(__name__)

Subscriber = Callable[[CertBundle], None]
MAX_SLEEP = 60.0  # re-read the clock at least this often (suspend, clock steps)
ROOT_CHECK_SECONDS = 5.0  # how often the configured root file is compared with the last seen
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
        # TRUST_DOMAIN='' (as istioctl writes it): take the one the CA issues, once.
        self._adopt_trust_domain = not config.trust_domain
        self._namespace, self._service_account = config.namespace, config.service_account
        self._warned_identity: tuple[str, str] | None = None
        self._root_seen: bytes | None = None
        self._refused_serial: int | None = None  # a cert a server refused in the handshake
        self._wake: asyncio.Event | None = None
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
        """Start from a valid stored cert (a reboot does not need the bootstrap token), unless
        it does not chain to the configured root: then it is discarded, with the reason."""
        bundle = self.store.load(self._clock())
        if bundle is not None:
            problem = self._root_problem(bundle)
            if problem:
                self._discard(bundle, f"stored certificate in {self.store.directory}", problem)
                return None
            log.info(
                "using stored certificate %s serial %s valid until %s",
                bundle.spiffe_id,
                bundle.serial_hex(),
                _iso(bundle.not_after),
            )
            self._learn_trust_domain(bundle)
            self._install(bundle)
        return bundle

    def _root_problem(self, bundle: CertBundle) -> str:
        """Why ``bundle`` does not chain to the configured root ("" if it does or if the root
        cannot be read now: the CA call will say so)."""
        try:
            return root_mismatch(bundle, self.ca.trusted_roots())
        except CaError:
            return ""

    def _discard(self, bundle: CertBundle, what: str, problem: str) -> None:
        log.warning(
            "discarding %s %s serial %s: %s %s (%s; re-onboarded to another mesh, or the root "
            "rotated); requesting a new one with the platform credential",
            what,
            bundle.spiffe_id,
            bundle.serial_hex(),
            problem,
            self.ca.target.root,
            self.ca.target.root_setting,
        )
        self.store.discard(keep=self.ca.target.root)
        if self.current is not None and self.current.serial == bundle.serial:
            self.current = None
            # No cert any more: renew as soon as the CSR floor allows.
            self.state = rotation.RotationState(
                failures=self.state.failures,
                retry_at=self.state.retry_at,
                last_error=self.state.last_error,
                last_attempt=self.state.last_attempt,
            )
            self.store.save_status(self.status())

    def check_root(self) -> bool:
        """If the configured root changed since the last look, discard the current cert when
        it no longer chains to it; True if it was discarded."""
        try:
            pem = self.ca.trusted_root_pem()
        except CaError:
            return False
        if pem == self._root_seen:
            return False
        self._root_seen = pem
        bundle = self.current
        problem = self._root_problem(bundle) if bundle is not None else ""
        if bundle is not None and problem:
            self._discard(bundle, "certificate", problem)
            return True
        return False

    def _learn_trust_domain(self, bundle: CertBundle) -> None:
        domain = trust_domain_of(bundle.spiffe_id)
        if not self._adopt_trust_domain or not domain:
            return
        self._adopt_trust_domain = False
        self.identity = spiffe_id(domain, self._namespace, self._service_account)
        log.info("TRUST_DOMAIN is empty: using the trust domain the CA issues, %r", domain)

    def _check_identity(self, bundle: CertBundle) -> None:
        """Warn once per distinct (issued, configured) pair, not on every certificate."""
        self._learn_trust_domain(bundle)
        if self.identity in bundle.spiffe_ids:
            self._warned_identity = None
            return
        pair = (bundle.spiffe_id, self.identity)
        if pair != self._warned_identity:
            self._warned_identity = pair
            log.warning("CA issued %s, configured identity is %s", *pair)

    def client_cert(self, now: float) -> tuple[bytes, bytes] | None:
        """(key PEM, chain PEM) to present to the CA and istiod: the current cert if it is
        valid a little longer and chains to the configured root."""
        self.check_root()
        bundle = self.current
        if bundle is None or bundle.not_after <= now + CLIENT_CERT_MARGIN:
            return None
        if bundle.serial == self._refused_serial:
            return None
        return bundle.key_pem, bundle.chain_pem

    def client_cert_refused(self, chain_pem: bytes) -> None:
        """A server (istiod) ended the TLS handshake because of this client certificate: stop
        presenting it and renew now (CSR floor permitting) with the platform credential."""
        bundle = self.current
        if bundle is None or bundle.chain_pem != chain_pem or self._refused_serial == bundle.serial:
            return
        self._refused_serial = bundle.serial
        log.warning(
            "the control plane refused the workload certificate %s serial %s in the TLS "
            "handshake; requesting a new one with the platform credential",
            bundle.spiffe_id,
            bundle.serial_hex(),
        )
        self.state = dataclasses.replace(self.state, rotate_at=self._clock())
        if self._wake is not None:
            self._wake.set()

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
        csr = build_csr(key, self.identity)
        try:
            chain = await self.ca.sign(csr, token, client_cert)
        except CaError as exc:
            if client_cert is None or exc.kind not in (CLIENT_CERT, CLOSED) or not token:
                raise
            # The handshake failed before the CSR reached the CA: the same CSR, without the
            # refused certificate, is still one CSR.
            chain = await self.ca.sign(csr, token, None)
            log.warning(
                "the CA refused the workload certificate in the TLS handshake (%s); "
                "re-issued with the platform credential",
                exc,
            )
        bundle = bundle_from_reply(
            chain, key, private_key_pem(key), self.ca.trusted_roots(), self._clock()
        )
        self._check_identity(bundle)
        self.store.save(bundle)
        return bundle

    async def renew(self) -> CertBundle:
        """One renewal, one CSR; IdentityError (old cert kept) on any failure. :meth:`run`
        spaces renewals by at least :data:`rotation.MIN_CSR_INTERVAL` seconds."""
        self.last_attempt = self._clock()
        self.state = rotation.on_attempt(self.state, self.last_attempt)
        try:
            bundle = await self._attempt()
        except (CredentialError, CaError, ChainError, StoreError, KeySpecError) as exc:
            message = f"{type(exc).__name__}: {exc}" if isinstance(exc, ChainError) else str(exc)
            self.state = rotation.on_failure(
                self.state, message, self._clock(), self.schedule, self._rng.uniform(-1, 1)
            )
            # Without a certificate nothing is being renewed yet: the first one is requested.
            if self.current is not None:
                log.error("certificate renewal failed: %s; keeping the current one", message)
            else:
                log.error("certificate request failed: %s", message)
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
        """Keep the certificate rotated for ever (cancel to stop). CSRs never go out more
        often than every :data:`rotation.MIN_CSR_INTERVAL` seconds, whatever the config, the
        certificate lifetime or the errors; the root file is re-checked every few seconds."""
        if self.current is None:
            self.load_from_disk()
        self._wake = wake = asyncio.Event()
        while True:
            self.check_root()
            action = rotation.next_action(self.state, self._clock())
            if isinstance(action, rotation.Wait):
                pause = min(MAX_SLEEP, ROOT_CHECK_SECONDS, action.until - self._clock())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(0.0, pause))
                wake.clear()
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
