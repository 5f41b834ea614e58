"""HTTP to cloud metadata servers with ``requests``: timeouts, bounded retries, clear errors.

One :class:`MetadataHttp` (one ``requests.Session``) per provider. A metadata server is
link-local and answers in milliseconds; a missing or broken one must neither hang the agent
nor be hammered: every request has a timeout, refused connections and HTTP 500/502/503/504 are
retried at most :data:`METADATA_RETRIES` times with exponential backoff (urllib3 ``Retry``),
and a read that times out is not retried (IMDSv2's hop-limit symptom).
"""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

from vmagent.identity.tokens import CredentialError

METADATA_TIMEOUT = 2.0  # seconds per request, as Istio's GCE client dials
METADATA_RETRIES = 2  # extra attempts after a refused connection or a 5xx answer
METADATA_BACKOFF = 0.25  # urllib3 backoff factor: retries after 0 s, then 0.5 s
MAX_BODY = 1 << 20  # bytes; metadata answers are a few KiB
RETRY_STATUSES = (500, 502, 503, 504)

if TYPE_CHECKING:
    import requests

# ``requests`` (with urllib3, idna, charset_normalizer: ~7.5 MB of RSS) is imported by the
# first MetadataHttp, not with this module: most agents read a token file and never need it.


@dataclasses.dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes
    headers: Mapping[str, str]


class MetadataTimeout(CredentialError):
    pass


class MetadataHttp:
    """A ``requests`` session for one metadata server.

    ``retries`` extra attempts (urllib3 ``Retry``) for refused connections and HTTP 500/502/
    503/504 on GET and PUT (both idempotent here), with exponential backoff; a read that times
    out is not retried (IMDSv2's hop-limit symptom must surface within one timeout). Proxies
    from the environment are ignored: metadata servers are link-local.
    """

    def __init__(self, retries: int = METADATA_RETRIES, timeout: float = METADATA_TIMEOUT):
        import requests
        import requests.adapters
        from urllib3.util.retry import Retry

        self.timeout = timeout
        self.session: requests.Session = requests.Session()
        self.session.trust_env = False
        retry = Retry(
            total=retries,
            connect=retries,
            read=0,
            status=retries,
            other=0,
            backoff_factor=METADATA_BACKOFF,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET", "PUT"}),
            raise_on_status=False,
            respect_retry_after_header=False,
        )
        adapter = requests.adapters.HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def request_sync(self, method: str, url: str, headers: Mapping[str, str]) -> HttpReply:
        """Blocking; CredentialError (MetadataTimeout for timeouts) when no answer arrives."""
        import requests
        import urllib3.exceptions

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CredentialError(f"metadata URL {url!r} must be http://host[:port]/...")
        try:
            with self.session.request(
                method,
                url,
                headers=dict(headers),
                timeout=self.timeout,
                stream=True,
                allow_redirects=False,
            ) as response:
                body = response.raw.read(MAX_BODY + 1, decode_content=True) or b""
                if len(body) > MAX_BODY:
                    raise CredentialError(f"{method} {url}: answer larger than {MAX_BODY} bytes")
                return HttpReply(
                    response.status_code, body, {k.lower(): v for k, v in response.headers.items()}
                )
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # Timeouts arrive as requests.Timeout, wrapped in a ConnectionError (urllib3's
            # MaxRetryError), or as urllib3's ReadTimeoutError from the body read.
            if _timed_out(exc):
                raise MetadataTimeout(
                    f"{method} {url}: no answer within {self.timeout:g}s"
                ) from None
            what = "cannot connect" if isinstance(exc, requests.ConnectionError) else "failed"
            raise CredentialError(f"{method} {url}: {what} ({_root_cause(exc)})") from None

    async def request(self, method: str, url: str, headers: Mapping[str, str]) -> HttpReply:
        """:meth:`request_sync` in a worker thread (requests blocks)."""
        return await asyncio.to_thread(self.request_sync, method, url, headers)


def _reasons(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it wraps (urllib3 ``reason``, then ``__context__``), outer first,
    at most 8 deep."""
    chain: list[BaseException] = [exc]
    for _ in range(7):
        inner = getattr(chain[-1], "reason", None)
        if not isinstance(inner, BaseException):
            inner = chain[-1].__context__ or chain[-1].__cause__
        if inner is None or inner in chain:
            break
        chain.append(inner)
    return chain


def _timed_out(exc: BaseException) -> bool:
    import requests
    import urllib3.exceptions

    timeouts = (TimeoutError, urllib3.exceptions.TimeoutError, requests.Timeout)
    # urllib3's NewConnectionError (refused, unresolvable) subclasses ConnectTimeoutError.
    refused = urllib3.exceptions.NewConnectionError
    return any(isinstance(e, timeouts) and not isinstance(e, refused) for e in _reasons(exc))


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, without the wrapper noise."""
    inner = _reasons(exc)[-1]
    text = str(inner)
    if "[Errno" in text:
        text = text[text.index("[Errno") :]
    return text or type(inner).__name__
