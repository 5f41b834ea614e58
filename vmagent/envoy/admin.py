"""A small client for Envoy's admin interface (thin shell over urllib, run in a thread).

Every call is bounded by ``timeout`` seconds and raises AdminError on any failure (refused,
timeout, non-2xx), so callers handle one exception."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.parse
import urllib.request

from vmagent.envoy import stats as envoy_stats


class AdminError(OSError):
    """The admin endpoint did not answer, or answered with an error status."""


class AdminClient:
    def __init__(self, host: str, port: int, timeout: float = 2.0) -> None:
        netloc = f"[{host}]" if ":" in host else host
        self.base = f"http://{netloc}:{port}"
        self.timeout = timeout

    async def request(self, method: str, path: str) -> str:
        return await asyncio.to_thread(self._request, method, path)

    def _request(self, method: str, path: str) -> str:
        request = urllib.request.Request(self.base + path, method=method)
        # No proxy: the admin endpoint is on loopback, whatever http_proxy says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=self.timeout) as reply:
                return bytes(reply.read()).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            raise AdminError(f"{method} {path}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise AdminError(f"{method} {path}: {exc}") from None

    async def server_state(self) -> str:
        try:
            return envoy_stats.server_state(await self.request("GET", "/server_info"))
        except ValueError as exc:
            raise AdminError(str(exc)) from None

    async def stats(self, regex: str, used_only: bool = True) -> dict[str, int]:
        query = ("usedonly&" if used_only else "") + "filter=" + urllib.parse.quote(regex)
        return envoy_stats.parse_stats(await self.request("GET", f"/stats?{query}"))

    async def drain_listeners(self, inbound_only: bool = True) -> str:
        """Istio's ``DrainListeners``: ``POST /drain_listeners?inboundonly&graceful``."""
        query = "inboundonly&graceful" if inbound_only else "graceful"
        return await self.request("POST", f"/drain_listeners?{query}")
