"""Local status: readiness and the agent's state document over HTTP (TCP and a Unix socket)."""

from vmagent.status.readiness import ReadinessLog
from vmagent.status.server import StatusServer, route

__all__ = ["ReadinessLog", "StatusServer", "route"]
