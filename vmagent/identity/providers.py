"""Platform credential providers: token file, GCE, AWS (IMDSv2 only) and Azure.

Each provider has ``source`` and ``async fetch(now) -> Credential``. HTTP to metadata servers
goes through one ``requests`` session per provider (:class:`~vmagent.identity.metadata.
MetadataHttp`: a timeout on every request, a bounded number of retries with backoff, never a
proxy), called in a worker thread. Answers are checked as the clouds document them;
anything else is a :class:`CredentialError` that says what went wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from vmagent.config import Config
from vmagent.identity.metadata import (
    METADATA_RETRIES,
    METADATA_TIMEOUT,
    HttpReply,
    MetadataHttp,
    MetadataTimeout,
)
from vmagent.identity.tokens import (
    AWS,
    AZURE,
    GCE,
    JWT,
    AwsIdentity,
    AzureIdentity,
    Credential,
    CredentialError,
    check_unexpired,
    encode_aws,
    encode_azure,
    inspect_token,
)

__all__ = [
    "METADATA_RETRIES",
    "METADATA_TIMEOUT",
    "AwsProvider",
    "AzureProvider",
    "CredentialProvider",
    "GceProvider",
    "HttpReply",
    "MetadataHttp",
    "MetadataTimeout",
    "TokenFileProvider",
]

log = logging.getLogger(__name__)

AWS_TOKEN_TTL = "21600"
AZURE_ATTESTED_API = "2020-09-01"
AZURE_INSTANCE_API = "2021-02-01"
AZURE_INSTANCE_FIELDS = (
    "vmId",
    "name",
    "resourceGroupName",
    "subscriptionId",
    "location",
    "vmScaleSetName",
)
# GCE tokens are refreshed this long before they expire (Istio's 25 minutes), or at half their
# lifetime if that is shorter.
GCE_REFRESH_MARGIN = 25 * 60.0


class CredentialProvider(Protocol):
    @property
    def source(self) -> str: ...

    async def fetch(self, now: float) -> Credential: ...


def _status_error(what: str, url: str, reply: HttpReply) -> CredentialError:
    body = reply.body[:200].decode("utf-8", "replace").strip()
    return CredentialError(f"{what}: {url} answered HTTP {reply.status}: {body or '(empty)'}")


def _text(reply: HttpReply, what: str) -> str:
    try:
        text = reply.body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialError(f"{what}: answer is not UTF-8 text") from None
    if not text:
        raise CredentialError(f"{what}: answer is empty")
    return text


def _json_object(text: str, what: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise CredentialError(f"{what}: answer is not JSON") from None
    if not isinstance(value, dict):
        raise CredentialError(f"{what}: answer is not a JSON object")
    return value


class TokenFileProvider:
    """Istio's ``istio-token``: re-read and trimmed at every use, sent as it is. A JWT is
    decoded only to learn its expiry (an expired one is refused with a clear error); any other
    token is opaque, which is fine, and said once in the log."""

    source = JWT

    def __init__(self, path: str) -> None:
        self.path = path
        self._warned_opaque = False

    async def fetch(self, now: float) -> Credential:
        path = Path(self.path)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise CredentialError(f"token file {path} does not exist") from None
        except PermissionError:
            # The usual cause: a token copied by hand as root (0600) for an agent that runs as
            # the unprivileged vmagent user (the systemd unit).
            raise CredentialError(
                f"token file {path} cannot be read: permission denied for this user"
                f" ({_user_name()}); make it readable to the agent's group: `chgrp vmagent"
                f" {path} && chmod 0640 {path}` (vmagent onboard --from DIR does this)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialError(f"token file {path} cannot be read: {exc}") from None
        if not token:
            raise CredentialError(f"token file {path} is empty")
        info = inspect_token(token)
        if info.problem and not self._warned_opaque:
            self._warned_opaque = True
            log.warning(
                "token file %s: expiry unknown (%s); sending it as an opaque bearer token",
                path,
                info.problem,
            )
        check_unexpired(info, now, f"token in {path}")
        return Credential(JWT, token, info.expires_at, f"token file {path}")


def gce_identity_url(config: Config) -> str:
    query = urllib.parse.urlencode({"audience": config.trust_domain, "format": "full"})
    host = config.gce_metadata_host.strip().rstrip("/")
    if "://" not in host:
        host = f"http://{host}"
    return f"{host}/computeMetadata/v1/instance/service-accounts/default/identity?{query}"


GCE_HEADERS = {"Metadata-Flavor": "Google", "User-Agent": "gcloud-golang/0.1"}


def gce_needs_refresh(cached: Credential | None, issued_at: float | None, now: float) -> bool:
    if cached is None or cached.expires_at is None:
        return True
    start = issued_at if issued_at is not None else cached.expires_at - 3600.0
    margin = min(GCE_REFRESH_MARGIN, (cached.expires_at - start) / 2)
    return now >= cached.expires_at - margin


class GceProvider:
    """GCE identity token with audience = trust domain; cached until well before ``exp``."""

    source = GCE

    def __init__(self, config: Config) -> None:
        self.url = gce_identity_url(config)
        self.trust_domain = config.trust_domain
        self._cached: Credential | None = None
        self._issued_at: float | None = None
        self._http = MetadataHttp()
        self._warned_opaque = False

    async def fetch(self, now: float) -> Credential:
        if not gce_needs_refresh(self._cached, self._issued_at, now) and self._cached:
            return self._cached
        if not self.trust_domain:
            raise CredentialError("GCE identity token: TRUST_DOMAIN is empty, no audience to ask")
        what = "GCE identity token"
        reply = await self._http.request("GET", self.url, GCE_HEADERS)
        if reply.status == 404:
            raise CredentialError(
                f"{what}: {self.url} answered 404: the instance has no service account"
            )
        if reply.status != 200:
            raise _status_error(what, self.url, reply)
        token = _text(reply, what)
        if any(c.isspace() or not c.isprintable() for c in token):
            raise CredentialError(f"{what}: answer is not a token (contains blanks or controls)")
        info = inspect_token(token)
        if info.problem and not self._warned_opaque:
            # Expiry unknown: not cached, fetched again at each use (a local call).
            self._warned_opaque = True
            log.warning("%s: expiry unknown (%s); sending it as it is", what, info.problem)
        check_unexpired(info, now, what)
        self._cached = Credential(GCE, token, info.expires_at, f"GCE metadata {self.url}")
        self._issued_at = info.issued_at
        return self._cached


def aws_endpoint(config: Config) -> str:
    if config.aws_ec2_metadata_service_endpoint:
        return config.aws_ec2_metadata_service_endpoint.rstrip("/")
    mode = config.aws_ec2_metadata_service_endpoint_mode.strip().lower()
    if mode == "ipv6":
        return "http://[fd00:ec2::254]"
    if mode in ("ipv4", ""):
        return "http://169.254.169.254"
    raise CredentialError(
        f"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE={config.aws_ec2_metadata_service_endpoint_mode!r}"
        ": expected IPv4 or IPv6"
    )


class AwsProvider:
    """EC2 instance identity document + ``rsa2048`` signature over IMDSv2. IMDSv1 is never
    used: without a session token there is no credential."""

    source = AWS

    def __init__(self, config: Config) -> None:
        self.endpoint = aws_endpoint(config)
        self._http = MetadataHttp()

    async def session_token(self) -> str:
        url = f"{self.endpoint}/latest/api/token"
        try:
            reply = await self._http.request(
                "PUT", url, {"X-aws-ec2-metadata-token-ttl-seconds": AWS_TOKEN_TTL}
            )
        except MetadataTimeout as exc:
            raise CredentialError(
                f"IMDSv2 session token: {exc}. A PUT that times out usually means the instance's"
                " metadata hop limit is too low for this host (containers need 2: aws ec2"
                " modify-instance-metadata-options --http-put-response-hop-limit 2)."
                " vmagent does not fall back to IMDSv1."
            ) from None
        if reply.status != 200:
            raise _status_error("IMDSv2 session token (IMDSv1 is never used)", url, reply)
        return _text(reply, "IMDSv2 session token")

    async def _read(self, path: str, token: str, what: str) -> str:
        url = f"{self.endpoint}{path}"
        reply = await self._http.request("GET", url, {"X-aws-ec2-metadata-token": token})
        if reply.status != 200:
            raise _status_error(what, url, reply)
        return _text(reply, what)

    async def fetch(self, now: float) -> Credential:
        token = await self.session_token()
        document = await self._read(
            "/latest/dynamic/instance-identity/document", token, "AWS identity document"
        )
        instance_id = _json_object(document, "AWS identity document").get("instanceId")
        if not isinstance(instance_id, str):
            raise CredentialError("AWS identity document: no instanceId")
        signature = await self._read(
            "/latest/dynamic/instance-identity/rsa2048", token, "AWS identity signature"
        )
        try:
            base64.b64decode("".join(signature.split()), validate=True)
        except binascii.Error:
            raise CredentialError("AWS identity signature: answer is not base64") from None
        bearer = encode_aws(AwsIdentity(document, signature))
        return Credential(AWS, bearer, None, f"AWS IMDSv2 {self.endpoint} ({instance_id})")


def azure_nonce(now: float) -> str:
    """Azure accepts up to 10 digits: the UNIX time, which a CA checks for freshness."""
    return f"{int(now):010d}"[-10:]


class AzureProvider:
    """Azure attested document (with a nonce) plus instance metadata."""

    source = AZURE

    def __init__(self, config: Config) -> None:
        self.endpoint = config.vmagent_azure_metadata_endpoint.rstrip("/")
        self._http = MetadataHttp()

    async def _get(self, path: str, query: Mapping[str, str], what: str) -> dict[str, object]:
        url = f"{self.endpoint}{path}?{urllib.parse.urlencode(query)}"
        reply = await self._http.request("GET", url, {"Metadata": "true"})
        if reply.status != 200:
            raise _status_error(what, url, reply)
        return _json_object(_text(reply, what), what)

    async def fetch(self, now: float) -> Credential:
        nonce = azure_nonce(now)
        what = "Azure attested document"
        attested = await self._get(
            "/metadata/attested/document", {"api-version": AZURE_ATTESTED_API, "nonce": nonce}, what
        )
        encoding, signature = attested.get("encoding"), attested.get("signature")
        if not isinstance(encoding, str) or not isinstance(signature, str) or not signature:
            raise CredentialError(f"{what}: answer lacks encoding/signature")
        instance = await self._get(
            "/metadata/instance", {"api-version": AZURE_INSTANCE_API}, "Azure instance metadata"
        )
        compute = instance.get("compute")
        if not isinstance(compute, dict):
            raise CredentialError("Azure instance metadata: no compute section")
        subset = {k: str(compute[k]) for k in AZURE_INSTANCE_FIELDS if compute.get(k)}
        bearer = encode_azure(AzureIdentity(encoding, signature.strip(), nonce, subset))
        vm = subset.get("name") or subset.get("vmId", "?")
        return Credential(AZURE, bearer, None, f"Azure IMDS {self.endpoint} ({vm})")


def _user_name() -> str:
    """This process's user name (its uid when it has none)."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"
