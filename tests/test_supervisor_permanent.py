"""The supervisor retries what may heal (network, CA down) and stops on what cannot
(a permanent misconfiguration, :class:`vmagent.config.ConfigError`)."""

from __future__ import annotations

import asyncio
import random

import pytest

from vmagent.config import ConfigError
from vmagent.supervisor import Supervisor


async def _forever() -> None:
    await asyncio.Event().wait()


def test_a_permanent_error_stops_every_part_and_is_raised() -> None:
    calls = 0
    other_cancelled = asyncio.Event()

    async def misconfigured() -> None:
        nonlocal calls
        calls += 1
        raise ConfigError("CREDENTIAL_FETCHER_TYPE='bogus' (from env): expected one of ...")

    async def other() -> None:
        try:
            await _forever()
        finally:
            other_cancelled.set()

    async def main() -> Supervisor:
        supervisor = Supervisor(random.Random(1))
        with pytest.raises(ConfigError, match="CREDENTIAL_FETCHER_TYPE='bogus'"):
            await asyncio.wait_for(supervisor.run({"identity": misconfigured, "xds": other}), 10)
        assert other_cancelled.is_set()
        return supervisor

    supervisor = asyncio.run(main())
    assert calls == 1  # not retried
    state = supervisor.snapshot()["identity"]
    assert state["state"] == "failed" and "bogus" in state["last_error"]
    assert state["restarts"] == 0


def test_a_transient_error_is_retried_with_backoff() -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise OSError("connection refused")
        await _forever()

    async def main() -> Supervisor:
        supervisor = Supervisor(random.Random(1))
        task = asyncio.ensure_future(supervisor.run({"xds": flaky}))
        for _ in range(100):  # bounded: backoff is 0.5-1 s, then 1-2 s
            if calls >= 3:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return supervisor

    supervisor = asyncio.run(main())
    assert calls == 3
    assert supervisor.parts["xds"].restarts == 2
