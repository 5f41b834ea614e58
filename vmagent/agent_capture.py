"""Traffic capture under ``vmagent run`` (docs/capture.md, "For `vmagent run`").

When cluster.env asks for capture (:func:`vmagent.capture.wanted`: ``ISTIO_META_DNS_CAPTURE``,
``ISTIO_SERVICE_CIDR`` or ``ISTIO_INBOUND_PORTS``) the agent installs it after its DNS proxy
listens and before Envoy starts, and removes it on stop. Two ways to run, as with Istio:

- **The agent as root** (or with CAP_NET_ADMIN): it applies the rules itself (idempotent with a
  prior ``vmagent capture apply``) and cleans them on stop. Before it opens any socket it takes
  the first exempt gid (``PROXY_GID``, default 1337) as its group, so its own upstream DNS
  queries and Envoy's connections (Envoy inherits the group) match ``--gid-owner`` and escape
  the capture; the applications, root's included (gid 0), stay captured.
- **The agent as the exempt user** (Istio's VM way: ``istio-iptables`` as root, then
  ``pilot-agent`` as istio-proxy): ``vmagent capture apply`` as root first; the agent finds the
  marker apply leaves in ``VMAGENT_RUN_DIR`` and leaves the rules alone (it cannot change them).

Capture asked for but impossible (no CAP_NET_ADMIN and no prior apply, or iptables refuses) is
fatal, as in Istio: :class:`~vmagent.config_values.ConfigError`, so ``vmagent run`` exits 2
naming the settings and ``vmagent capture apply`` as the alternative. ``VMAGENT_CAPTURE=false``
leaves iptables alone whatever cluster.env says (``vmagent dev``, the tests on a shared host).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from vmagent.capture import CaptureError, apply_capture, clean_capture, wanted
from vmagent.capture.shell import APPLIED_MARKER, proxy_ids, read_dns_state
from vmagent.config import Config
from vmagent.config_values import ConfigError

log = logging.getLogger("vmagent")

CAP_NET_ADMIN = 12  # <linux/capability.h>
SETTINGS = "ISTIO_META_DNS_CAPTURE / ISTIO_SERVICE_CIDR / ISTIO_INBOUND_PORTS"
BY_AGENT, BY_APPLY = "agent", "vmagent capture apply"


def has_net_admin(status: str) -> bool:
    """Whether ``/proc/self/status`` text shows CAP_NET_ADMIN in the effective set."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def _own_net_admin() -> bool:
    try:
        return has_net_admin(Path("/proc/self/status").read_text())
    except OSError:
        return os.geteuid() == 0


class AgentCapture:
    """The agent's capture: :meth:`prepare` before any socket, :meth:`start` once the DNS
    proxy listens, :meth:`stop` on every exit (idempotent)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # VMAGENT_CAPTURE=false: the rules are `vmagent capture apply`'s business alone.
        self.wanted = wanted(config) and config.vmagent_capture
        self.capable = self.wanted and _own_net_admin()
        self.asked = wanted(config)  # cluster.env asks, whatever VMAGENT_CAPTURE says
        self.applied = False  # by this agent: only then is it cleaned on stop
        self.last_error: str | None = None

    def prepare(self) -> None:
        """As root with capture to apply: take the first exempt gid (real, effective, saved;
        supplementary groups cleared) unless this uid is exempt already."""
        if not self.capable or os.geteuid() != 0:
            return
        uids, gids = proxy_ids(self.config)
        if str(os.getuid()) in uids or str(os.getgid()) in gids:
            return
        gid = int(gids[0])
        os.setgroups([])
        os.setgid(gid)
        log.info("capture: running as gid %d (PROXY_GID) so the agent and Envoy escape it", gid)

    async def start(self) -> None:
        """Apply the capture (ConfigError when it cannot be)."""
        if not self.wanted:
            return
        self._check_exempt()
        marker = Path(self.config.vmagent_run_dir) / APPLIED_MARKER
        if not self.capable:
            if marker.exists():
                log.info(
                    "capture: installed by `vmagent capture apply` (%s); kept as it is", marker
                )
                return
            raise ConfigError(
                f"cluster.env asks for traffic capture ({SETTINGS}) but vmagent run lacks"
                " CAP_NET_ADMIN: run it as root (it applies and removes the capture itself), or"
                " run `vmagent capture apply` as root first (as istio-iptables before"
                " pilot-agent), or set VMAGENT_CAPTURE=false to leave the rules to others"
            )
        try:
            await asyncio.to_thread(apply_capture, self.config)
        except (CaptureError, OSError) as exc:
            raise ConfigError(f"traffic capture ({SETTINGS}): {exc}") from None
        self.applied = True
        log.info("capture: applied (DNS fail-open watchdog running when DNS is captured)")

    def _check_exempt(self) -> None:
        """The agent's own uid or gid must be exempt: else its upstream DNS queries would be
        redirected to itself (istio/istio#30309) and Envoy's connections back into Envoy."""
        uids, gids = proxy_ids(self.config)
        uid, gid = os.getuid(), os.getgid()
        if str(uid) in uids or str(gid) in gids:
            return
        raise ConfigError(
            f"traffic capture ({SETTINGS}): vmagent run runs as uid {uid} gid {gid}, and the"
            f" rules exempt only uids {','.join(uids)} and gids {','.join(gids)}: its own DNS"
            " queries and Envoy's connections would loop back into it; run it as one of those"
            " users, or add its uid to PROXY_UID (or its gid to PROXY_GID)"
        )

    async def stop(self) -> None:
        """Remove the capture this agent applied (errors are logged: stopping goes on)."""
        if not self.applied:
            return
        self.applied = False
        try:
            await asyncio.to_thread(clean_capture, self.config)
            log.info("capture: removed")
        except (CaptureError, OSError) as exc:
            self.last_error = f"could not remove the rules: {exc}"
            log.error("capture: could not remove the rules: %s; run `vmagent capture clean`", exc)

    def status(self) -> dict[str, Any]:
        """The capture part of the agent's raw state (:meth:`vmagent.agent.Agent.state`):
        ``{asked, wanted, applied, by, dns_captured, dns_redirect, dns_redirect_since,
        last_error}``. ``applied`` is read from the marker now (``vmagent capture clean`` run
        meanwhile shows as not applied); ``by``: "agent", "vmagent capture apply" (the marker
        without this agent applying: root did beforehand) or None; ``dns_redirect``: "on",
        "off" (dropped by the fail-open watchdog: the agent's DNS port did not answer) or None
        (DNS not captured, or not known), ``dns_redirect_since`` its epoch seconds. Two small
        reads in VMAGENT_RUN_DIR (a tmpfs)."""
        run_dir = self.config.vmagent_run_dir
        marked = (Path(run_dir) / APPLIED_MARKER).exists()
        applied = marked  # the agent's own apply leaves the marker too
        by = (BY_AGENT if self.applied else BY_APPLY) if applied else None
        redirect, since, watch_error = read_dns_state(run_dir) if applied else (None, None, None)
        return {
            "asked": self.asked,
            "wanted": self.wanted,
            "applied": applied,
            "by": by,
            "dns_captured": bool(self.config.istio_meta_dns_capture),
            "dns_redirect": redirect,
            "dns_redirect_since": since,
            "last_error": self.last_error or watch_error,
        }
