"""The CSR floor: however the grace ratio is set, however short the certificates the CA issues,
and whatever fails, the agent never sends more than one CSR per MIN_CSR_INTERVAL seconds.

(``SECRET_GRACE_PERIOD_RATIO=7`` once made the agent request 425 certificates in 4 s.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from pathlib import Path

import pytest

from vmagent.identity import create_manager, rotation

from .helpers import agent, agent_values, ca_settings, make_config, running_ca
from .test_ca_failures import start_faulty

pytestmark = pytest.mark.timeout(60)


def simulate(
    schedule: rotation.Schedule, lifetime: float, horizon: float, fail: bool = False
) -> list[float]:
    """Drive the pure core as the manager does, against a CA that answers at once with a cert
    of ``lifetime`` seconds (or fails); returns the times CSRs went out."""
    state, now, sent = rotation.RotationState(), 0.0, []
    for _ in range(100_000):  # bounded: far more steps than any correct schedule needs
        if now > horizon:
            break
        action = rotation.next_action(state, now)
        if isinstance(action, rotation.Wait):
            assert action.until > now, "a Wait that does not move time forward is a hot loop"
            now = action.until
            continue
        sent.append(now)
        state = rotation.on_attempt(state, now)
        if fail:
            state = rotation.on_failure(state, "CA answered an expired cert", now, schedule, 0.0)
        else:
            state = rotation.on_issued(state, now, now + lifetime, schedule, 0.0)
        now += 0.001  # the CA's round trip
    return sent


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize(
    ("ratio", "jitter", "lifetime"),
    [
        (7.0, 0.0, 86400.0),  # the misconfiguration of the report
        (0.5, 0.01, 0.01),  # a CA that issues 10 ms certificates
        (1.0, 0.0, 1.0),
        (-3.0, 5.0, 3600.0),
        (float("nan"), float("inf"), 3600.0),
        (0.5, 0.01, -30.0),  # already expired when issued
    ],
)
def test_no_two_csrs_closer_than_the_floor(ratio: float, jitter: float, lifetime: float) -> None:
    sent = simulate(rotation.Schedule(ratio, jitter), lifetime, horizon=60.0)
    assert sent[0] == 0.0  # the first CSR goes out at once
    assert min(gaps(sent), default=60.0) >= rotation.MIN_CSR_INTERVAL
    assert len(sent) <= 60.0 / rotation.MIN_CSR_INTERVAL + 1
    four_seconds = [t for t in sent if t < 4.0]
    assert len(four_seconds) == 1  # was 425 with a ratio of 7


def test_failures_back_off_from_the_floor() -> None:
    sent = simulate(rotation.Schedule(), 3600.0, horizon=600.0, fail=True)
    assert gaps(sent)[:4] == pytest.approx([5.0, 10.0, 20.0, 40.0], abs=0.01)
    assert max(gaps(sent)) <= rotation.RETRY_CAP + 0.01
    assert len(sent) < 20


def test_a_normal_schedule_is_unchanged() -> None:
    sent = simulate(rotation.Schedule(0.5, 0.0), 86400.0, horizon=86400.0 * 2)
    assert gaps(sent) == pytest.approx([43200.0] * 4, abs=0.01)


def test_short_lived_certificates_from_the_dev_ca_are_not_a_hot_loop(tmp_path: Path) -> None:
    """A real 1-second certificate from the dev CA, and a grace ratio of 7 set behind the
    config's back: in 6 s the running agent sends 2 CSRs (at 0 s and 5 s), not hundreds."""

    async def scenario() -> None:
        async with running_ca(ca_settings(tmp_path)) as ca:
            (tmp_path / "istio-token").write_text(
                ca.authority.mint_token("shop", "cart", time.time())
            )
            # SECRET_TTL below 10s is refused at load: ask for 1 s behind the config's back.
            config = make_config(tmp_path, **agent_values(tmp_path, ca))
            manager = await create_manager(dataclasses.replace(config, secret_ttl=1.0), {})
            manager.schedule = rotation.Schedule(7.0, 0.0)
            task = asyncio.ensure_future(manager.run())
            try:
                await asyncio.sleep(6.0)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert manager.current is not None
            assert manager.current.not_after - manager.current.created <= 2.0  # really short
            assert 1 <= len(ca.service.issued) <= 2

    asyncio.run(scenario())


def test_a_ca_answering_expired_certificates_is_not_a_hot_loop(tmp_path: Path) -> None:
    async def scenario() -> None:
        ca, service = await start_faulty(tmp_path)
        try:
            manager = await agent(tmp_path, ca)
            service.script = ["expired"] * 100
            task = asyncio.ensure_future(manager.run())
            try:
                await asyncio.sleep(6.0)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert manager.current is None
            assert "expired" in manager.state.last_error
            assert 1 <= len(service.requests) <= 2  # at 0 s and 5 s
        finally:
            await ca.stop()

    asyncio.run(scenario())
