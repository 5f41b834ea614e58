"""Readiness probes for the VM's workload, reported as Istio health transitions.

Typical use (the agent owns the task; the xDS client turns each :class:`HealthEvent` into a
``type.googleapis.com/istio.v1.HealthInformation`` request)::

    probe = mesh["defaultConfig"]["readinessProbe"]
    spec = parse_probe(probe, where="defaultConfig.readinessProbe")
    checker = HealthChecker(spec, on_event=xds.report_health)
    task_group.create_task(checker.run())
    ...
    checker.status().as_dict()  # for the status page

The spec parser (:mod:`._spec`) and the threshold state machine (:mod:`._state`) are pure; the
probers and the loop are thin asyncio shells around them.
"""

from ._checker import EventCallback, HealthChecker, HealthStatus, PreCheck
from ._probers import run_probe
from ._spec import (
    ExecAction,
    GrpcAction,
    HttpGetAction,
    ProbeAction,
    ProbeSpec,
    ProbeSpecError,
    TcpSocketAction,
    parse_probe,
)
from ._state import HealthEvent, HealthState, ProbeResult, Thresholds

__all__ = [
    "EventCallback",
    "ExecAction",
    "GrpcAction",
    "HealthChecker",
    "HealthEvent",
    "HealthState",
    "HealthStatus",
    "HttpGetAction",
    "PreCheck",
    "ProbeAction",
    "ProbeResult",
    "ProbeSpec",
    "ProbeSpecError",
    "TcpSocketAction",
    "Thresholds",
    "parse_probe",
    "run_probe",
]
