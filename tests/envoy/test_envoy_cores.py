"""Pure cores: admin answer parsing (on output captured from the real Envoy, in ``data/``),
the restart/backoff state machine, and the log-line plumbing."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from vmagent.envoy.lifecycle import Lifecycle, RestartPolicy, describe_exit, rfc3339
from vmagent.envoy.process import line_level, pump_lines
from vmagent.envoy.stats import (
    active_connections,
    agent_listener_ports,
    not_live_reasons,
    parse_stats,
    server_state,
)

DATA = Path(__file__).resolve().parent / "data"


def read(name: str) -> str:
    return (DATA / name).read_text()


# --- admin answers ---


def test_parse_stats_keeps_integers_and_skips_text_and_histograms() -> None:
    stats = parse_stats(read("stats_updates_live.txt"))
    assert stats["cluster_manager.cds.update_success"] == 1
    assert stats["listener_manager.lds.update_success"] == 1
    assert stats["cluster_manager.cds.version"] == 13237225503670494420
    assert "cluster_manager.cds.version_text" not in stats  # text stat
    assert "cluster_manager.cds.update_duration" not in stats  # histogram


def test_live_needs_server_live_and_both_cds_and_lds_updates() -> None:
    live = parse_stats(read("stats_updates_live.txt"))
    assert server_state(read("server_info_live.json")) == "LIVE"
    assert not_live_reasons("LIVE", live) == []
    # Envoy whose ADS socket nobody serves: admin answers, the server stays PRE_INITIALIZING
    # (initial_fetch_timeout 0s waits for ever) and no update succeeded.
    waiting = parse_stats(read("stats_updates_no_xds.txt"))
    reasons = not_live_reasons("PRE_INITIALIZING", waiting)
    assert reasons == [
        "Envoy server state is PRE_INITIALIZING, not LIVE",
        "Envoy has no config from the control plane yet (cds updates: 0 successful, 0 "
        "rejected; lds updates: 0 successful, 0 rejected)",
    ]
    half = {**live, "listener_manager.lds.update_success": 0}
    assert not_live_reasons("LIVE", half) == [
        "Envoy config not fully received (cds updates: 1 successful, 0 rejected; lds updates: "
        "0 successful, 0 rejected)"
    ]
    rejected = {**half, "listener_manager.lds.update_rejected": 2}
    assert "rejected" in not_live_reasons("LIVE", rejected)[0]


def test_server_state_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        server_state("<html>")
    with pytest.raises(ValueError, match="no state"):
        server_state("{}")


def test_active_connections_counts_workload_listeners_only() -> None:
    stats = parse_stats(read("stats_active_one_inbound.txt"))
    own = agent_listener_ports((15021, 15090))
    # One inbound connection; the admin connection asking and the per-worker copy do not count.
    assert active_connections(stats, own) == 1
    assert active_connections({**stats, "listener.0.0.0.0_15021.downstream_cx_active": 4}, own) == 1
    assert active_connections({"listener.[__]_15090.downstream_cx_active": 2}, own) == 0
    internal = {"listener.envoy_internal_main.downstream_cx_active": 3}
    assert active_connections(internal, own) == 0
    assert active_connections({}, own) is None  # nothing reported: Istio stops waiting


# --- restart state machine ---


def test_crashes_back_off_exponentially_bounded_and_reset_after_a_stable_run() -> None:
    life = Lifecycle(RestartPolicy(base=1.0, cap=8.0, stable_seconds=60.0))
    now = 1000.0
    delays = []
    for pid in range(100, 106):
        life.started(pid, now, 1_700_000_000.0)
        now += 2.0  # crashes after 2 s: never stable
        delay = life.exited(-9, now, fraction=0.999)
        assert delay is not None
        delays.append(round(delay, 2))
        now += delay
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # ~top of 1, 2, 4, 8 s, capped at 8
    assert life.restarts == 6 and life.state == "backoff" and life.last_exit == "SIGKILL"
    life.started(200, now, 1_700_000_100.0)
    delay = life.exited(1, now + 61.0, fraction=0.0)  # ran 61 s: the backoff starts afresh
    assert delay == 0.5 and life.failures == 1 and life.last_exit == 1


def test_exit_while_stopping_is_not_a_crash() -> None:
    life = Lifecycle()
    life.started(7, 10.0, 0.0)
    life.became_live()
    assert life.state == "live"
    life.stop_requested()
    assert life.state == "draining"
    assert life.exited(0, 20.0, 0.5) is None
    assert (life.state, life.restarts, life.last_exit, life.pid) == ("stopped", 0, 0, None)


def test_status_snapshot_shape() -> None:
    life = Lifecycle()
    assert life.snapshot(0.0) == {
        "pid": None,
        "state": "stopped",
        "restarts": 0,
        "last_exit": None,
        "started": None,
        "uptime_seconds": None,
    }
    life.started(42, 100.0, 1_796_000_000.25)
    snap = life.snapshot(112.5)
    assert snap["pid"] == 42 and snap["state"] == "starting"
    assert snap["started"] == "2026-11-30T00:53:20.250Z" and snap["uptime_seconds"] == 12.5


def test_describe_exit_and_rfc3339() -> None:
    assert describe_exit(0) == 0 and describe_exit(1) == 1
    assert describe_exit(-9) == "SIGKILL" and describe_exit(-15) == "SIGTERM"
    assert describe_exit(-99) == "signal 99"
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"


# --- log lines ---


def test_line_level_reads_both_envoy_formats() -> None:
    assert line_level("[warning][main] no limit") == logging.WARNING
    assert line_level("[2026-11-29 12:00:00.000][7][error][config] bad") == logging.ERROR
    assert line_level("[critical][assert] x") == logging.CRITICAL
    assert line_level("[debug][pool] x") == logging.DEBUG
    assert line_level("plain text") == logging.INFO


def test_pump_logs_every_line_prefixed_even_long_and_unterminated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.envoy")

    async def scenario() -> None:
        reader = asyncio.StreamReader(limit=64)
        reader.feed_data(b"[info][main] one\n[error][config] two\r\n" + b"x" * 100 + b"\ntail")
        reader.feed_eof()
        await pump_lines(reader, logging.getLogger("test.envoy"))

    asyncio.run(scenario())
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages[:2] == [
        (logging.INFO, "envoy: [info][main] one"),
        (logging.ERROR, "envoy: [error][config] two"),
    ]
    assert all(m.startswith("envoy: ") for _, m in messages)
    assert "".join(m[len("envoy: ") :] for _, m in messages[2:-1]) == "x" * 100
    assert messages[-1] == (logging.INFO, "envoy: tail")
