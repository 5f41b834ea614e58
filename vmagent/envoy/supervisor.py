"""Runs Envoy under the agent (thin asyncio shell over :mod:`vmagent.envoy.lifecycle`).

Use::

    supervisor = EnvoySupervisor(options, node, binary)   # binary: resolve_binary(...)
    task = asyncio.create_task(supervisor.run())          # after SDS and the xDS proxy listen
    supervisor.live / supervisor.not_ready_reason()       # for the agent's readiness
    supervisor.status()                                   # the "envoy" part of /status
    await supervisor.stop()                               # on SIGTERM: drain, then end Envoy

``run`` writes the bootstrap, starts Envoy (its stdout/stderr go to the ``vmagent.envoy`` log,
each line prefixed ``envoy:``), polls the admin endpoint until LIVE, and restarts a crashed
Envoy with backoff until ``stop``. ``stop`` follows ``pkg/envoy/agent.go`` ``terminate``:
``POST /drain_listeners?inboundonly&graceful``, then wait ``terminationDrainDuration`` (or,
with ``EXIT_ON_ZERO_ACTIVE_CONNECTIONS``, ``MINIMUM_DRAIN_DURATION`` and then until no workload
connection is left, checked every second, at most ``drainDuration`` in all), then SIGTERM, and
SIGKILL after ``kill_timeout``. Cancelling ``run`` without ``stop`` kills Envoy at once; the
agent dying kills it too (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from vmagent.envoy.admin import AdminClient, AdminError
from vmagent.envoy.binary import EnvoyBinary
from vmagent.envoy.bootstrap import build_bootstrap, command_line, loopback
from vmagent.envoy.lifecycle import Lifecycle, RestartPolicy
from vmagent.envoy.options import EnvoyOptions
from vmagent.envoy.process import LINE_LIMIT, pump_lines, spawn
from vmagent.envoy.stats import (
    ACTIVE_CONNECTIONS_FILTER,
    UPDATE_STATS_FILTER,
    active_connections,
    agent_listener_ports,
    not_live_reasons,
)
from vmagent.xds.node import NodeInfo

log = logging.getLogger("vmagent.envoy")

LIVE_POLL_SECONDS = 0.25
ZERO_CONNECTIONS_POLL_SECONDS = 1.0  # Istio's activeConnectionCheckDelay
MAX_STATS_ERRORS = 5  # Istio gives up counting connections after 5 failed polls
PUMP_DRAIN_SECONDS = 2.0


class EnvoySupervisor:
    def __init__(
        self,
        options: EnvoyOptions,
        node: NodeInfo,
        binary: EnvoyBinary,
        policy: RestartPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``node``: the one the agent's xDS client sends (Envoy presents the same)."""
        self.options = options
        self.node = node
        self.binary = binary
        self.lifecycle = Lifecycle(policy or RestartPolicy())
        self.admin = AdminClient(loopback(node.ips), options.admin_port)
        self._rng = rng or random.Random()
        self._proc: asyncio.subprocess.Process | None = None
        self._ps: psutil.Process | None = None
        self._live = False
        self._not_live = "Envoy not started yet"
        self._stop = asyncio.Event()
        self._running = False
        self._done = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        # Awaited after the drain, before SIGTERM (the agent ends SDS and xDS streams there,
        # so Envoy's own shutdown does not cut them and log warnings).
        self.before_terminate: Callable[[], Awaitable[None]] | None = None

    # --- what the agent reads ---

    @property
    def live(self) -> bool:
        return self._live

    def not_ready_reason(self) -> str | None:
        return None if self._live else self._not_live

    def status(self) -> dict[str, Any]:
        """The ``envoy`` part of ``/status`` (see Lifecycle.snapshot) plus ``live``,
        ``not_ready``, ``version`` and ``process`` (rss_bytes, cpu_seconds, cpu_percent,
        threads, children; None when no Envoy runs)."""
        doc = self.lifecycle.snapshot(time.monotonic())
        doc["live"] = self._live
        doc["not_ready"] = self.not_ready_reason()
        doc["version"] = self.binary.version_text
        doc["process"] = self._process_stats()
        return doc

    def _process_stats(self) -> dict[str, Any] | None:
        ps = self._ps
        if ps is None or self.lifecycle.pid is None:
            return None
        try:
            with ps.oneshot():
                cpu = ps.cpu_times()
                return {
                    "rss_bytes": ps.memory_info().rss,
                    "cpu_seconds": round(cpu.user + cpu.system, 3),
                    "cpu_percent": ps.cpu_percent(None),  # since the previous status()
                    "threads": ps.num_threads(),
                    "children": len(ps.children(recursive=True)),
                }
        except psutil.Error:
            return None

    # --- running ---

    async def run(self) -> None:
        """Run Envoy until :meth:`stop` (returns) or cancellation (kills Envoy). OSError if
        Envoy cannot be spawned at all (the agent's part supervisor retries)."""
        self._running = True
        self._done.clear()
        try:
            while not self._stop.is_set():
                proc = await self._spawn()
                if self._stop.is_set():  # stop() came while spawning: nothing to drain yet
                    proc.terminate()
                returncode = await self._watch(proc)
                delay = self.lifecycle.exited(returncode, time.monotonic(), self._rng.random())
                self._live = False
                if delay is None:
                    log.info("envoy stopped (%s)", self.lifecycle.last_exit)
                    break
                self._not_live = f"Envoy exited ({self.lifecycle.last_exit}), restarting"
                log.error(
                    "envoy exited (%s); restart %d in %.1fs",
                    self.lifecycle.last_exit, self.lifecycle.restarts, delay,
                )  # fmt: skip
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            self._kill_now()
            self._running = False
            self._done.set()

    async def stop(self) -> None:
        """Drain and end Envoy (see the module docstring); returns once it is gone. A second
        call waits for the first one's sequence instead of draining again."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_sequence())
        await asyncio.shield(self._stopping)

    async def kill(self) -> None:
        """End Envoy at once, without draining (the agent restarts its parts on a reload);
        returns once it is gone."""
        self._stop.set()
        self.lifecycle.stop_requested()
        self._not_live = "Envoy is stopping"
        self._live = False
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._running:
            await self._done.wait()

    async def _stop_sequence(self) -> None:
        self._stop.set()
        self.lifecycle.stop_requested()
        self._not_live = "Envoy is stopping"
        self._live = False
        proc = self._proc
        if proc is not None and proc.returncode is None:
            await self._drain(proc)
            if proc.returncode is None and self.before_terminate is not None:
                await self.before_terminate()
            if proc.returncode is None:
                log.info("envoy: sending SIGTERM to %d", proc.pid)
                proc.terminate()
                if not await _exited(proc, self.options.kill_timeout):
                    log.warning("envoy: still running after SIGTERM, sending SIGKILL")
                    proc.kill()
                    await proc.wait()
        if self._running:
            await self._done.wait()

    async def _drain(self, proc: asyncio.subprocess.Process) -> None:
        try:
            await self.admin.drain_listeners(inbound_only=True)
            log.info("envoy: draining inbound listeners")
        except AdminError as exc:
            log.warning("envoy: cannot drain listeners: %s", exc)
        opts = self.options
        if not opts.exit_on_zero_active_connections:
            await _exited(proc, opts.termination_drain_duration)
            return
        if await _exited(proc, opts.minimum_drain_duration):
            return
        own = agent_listener_ports((opts.readiness_port, opts.prometheus_port))
        deadline = time.monotonic() + max(0.0, opts.drain_duration - opts.minimum_drain_duration)
        errors = 0
        while time.monotonic() < deadline:
            if await _exited(proc, ZERO_CONNECTIONS_POLL_SECONDS):
                return
            try:
                count = active_connections(await self.admin.stats(ACTIVE_CONNECTIONS_FILTER), own)
            except AdminError as exc:
                errors += 1
                log.warning("envoy: cannot count active connections (%d): %s", errors, exc)
                if errors >= MAX_STATS_ERRORS:
                    return
                continue
            errors = 0
            if not count:
                log.info("envoy: no active connections left")
                return
            log.info("envoy: %d active connections left", count)
        log.info("envoy: drain time over with connections still open")

    async def _spawn(self) -> asyncio.subprocess.Process:
        self._write_bootstrap()
        argv = command_line(
            self.binary.path, self.options.bootstrap_path, self.options, self.node.ips
        )
        proc = await spawn(
            argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
            # Own session: a Ctrl-C in the agent's terminal must not skip the drain.
            start_new_session=True,
        )
        self._proc = proc
        self.lifecycle.started(proc.pid, time.monotonic(), time.time())
        try:
            self._ps = psutil.Process(proc.pid)
        except psutil.Error:
            self._ps = None
        self._not_live = "Envoy is starting"
        log.info("envoy started: pid %d: %s", proc.pid, " ".join(argv))
        return proc

    async def _watch(self, proc: asyncio.subprocess.Process) -> int:
        """Pump its output and poll for LIVE until the process exits; its return code."""
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.ensure_future(pump_lines(proc.stdout, log)),
            asyncio.ensure_future(pump_lines(proc.stderr, log)),
        ]
        poll = asyncio.ensure_future(self._poll_live(proc))
        try:
            returncode = await proc.wait()
        finally:
            poll.cancel()
            # Output written just before the exit is still in the pipes: let it through.
            _, pending = await asyncio.wait(pumps, timeout=PUMP_DRAIN_SECONDS)
            for task in (*pending, poll):
                task.cancel()
        return returncode

    async def _poll_live(self, proc: asyncio.subprocess.Process) -> None:
        """Until LIVE (then LIVE stays, as Istio's probe caches it) or the process ends."""
        while proc.returncode is None and not self._stop.is_set():
            reasons = await self.check_live()
            if not reasons:
                self._live = True
                self.lifecycle.became_live()
                log.info("envoy is LIVE (pid %d)", proc.pid)
                return
            self._not_live = "; ".join(reasons)
            await asyncio.sleep(LIVE_POLL_SECONDS)

    async def check_live(self) -> list[str]:
        """Why Envoy is not LIVE now (empty: it is); asks the admin endpoint."""
        try:
            state = await self.admin.server_state()
            update_stats = await self.admin.stats(UPDATE_STATS_FILTER)
        except AdminError as exc:
            return [f"Envoy admin endpoint not answering: {exc}"]
        return not_live_reasons(state, update_stats)

    def _write_bootstrap(self) -> None:
        path = self.options.bootstrap_path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(build_bootstrap(self.node, self.options), out, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def _kill_now(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            log.warning("envoy: killing pid %d (the agent stopped without draining)", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


async def _exited(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process to end; whether it did."""
    try:
        await asyncio.wait_for(proc.wait(), max(0.0, timeout))
    except asyncio.TimeoutError:
        return False
    return True
