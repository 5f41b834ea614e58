"""``vmagent status --wait SECONDS`` (cloud-init's ``runcmd``): exit 0 as soon as a real agent
(``vmagent run`` against ``vmagent devmesh serve``) is healthy, having waited through "not
running yet"; at the deadline the usual answer and exit status (3 when nothing runs, 1 with the
problems when degraded), one JSON document with ``--json``, asking at most once a second; bad
values and ``--watch`` with it are usage errors naming ``--wait`` (and bad ``--watch`` and
``--count`` values name theirs)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from e2e_helpers import World, wait_for
from test_status_command import status
from test_status_view import NOW, raw_state

from vmagent.status.view import status_v1


@pytest.mark.timeout(120)
def test_wait_returns_0_once_the_agent_is_ready(world: World) -> None:
    mesh = world.devmesh()
    agent = world.agent(mesh)
    env = agent.env()
    err = world.tmp / "wait.stderr"
    with err.open("wb") as stderr:
        waiting = subprocess.Popen(
            [sys.executable, "-m", "vmagent", "status", "--wait", "90", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    try:
        # It waits through "not running yet" (no socket: the service may still be starting).
        wait_for(lambda: "not running yet" in err.read_text(), 30, "--wait waiting")
        assert waiting.poll() is None
        agent.start()
        out, _ = waiting.communicate(timeout=90)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(10)
    assert waiting.returncode == 0, err.read_text()
    view = json.loads(out)  # one document
    assert view["state"] == "healthy" and view["problems"] == []
    # The agent capture is off here (VMAGENT_CAPTURE=false although cluster.env asks).
    assert view["capture"]["applied"] is False and view["capture"]["cluster_env_asks"] is True
    text = status(Path(env["VMAGENT_RUN_DIR"]), "--wait", "30")
    assert text.returncode == 0, text
    assert "Capture\n  off (VMAGENT_CAPTURE=false)" in text.stdout


def test_wait_gives_up_with_3_when_nothing_runs(tmp_path: Path) -> None:
    start = time.monotonic()
    done = status(tmp_path, "--wait", "2")
    took = time.monotonic() - start
    assert done.returncode == 3, done
    assert "not running" in done.stderr and "status.sock: no socket" in done.stderr
    assert 2 <= took < 6, took  # a bound on the deadline, not a speed claim
    assert "Traceback" not in done.stderr


@pytest.fixture
def degraded_agent() -> Iterator[tuple[str, list[float]]]:
    """A stand-in status endpoint answering a degraded document (a failing probe); returns
    HOST:PORT and the times it was asked."""
    health = raw_state()["health"] | {
        "state": "unhealthy", "lastResult": {"healthy": False, "message": "HTTP 503"},
    }  # fmt: skip
    body = json.dumps(status_v1(raw_state(health=health), NOW)).encode()
    asked: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(time.monotonic())
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def test_wait_ends_degraded_with_the_problems_asking_once_a_second(
    tmp_path: Path, degraded_agent: tuple[str, list[float]]
) -> None:
    addr, asked = degraded_agent
    done = status(tmp_path, "--wait", "2.5", "--json", "--addr", addr)
    assert done.returncode == 1, done
    view = json.loads(done.stdout)  # one document, the last answer
    assert view["state"] == "degraded" and view["problems"][0]["part"] == "health"
    assert "degraded: health" in done.stderr
    assert 2 <= len(asked) <= 4, asked  # t = 0, 1, 2 (and the deadline): never hammered
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    assert all(gap >= 0.45 for gap in gaps), gaps
    text = status(tmp_path, "--wait", "1", "--addr", addr)
    assert text.returncode == 1
    assert "what to do: check the application" in text.stdout


@pytest.mark.parametrize("value", ["0", "-1", "abc", "86401", "nan", "inf", ""])
def test_bad_wait_is_a_usage_error_naming_the_flag(tmp_path: Path, value: str) -> None:
    done = status(tmp_path, "--wait", value)
    assert done.returncode == 2, done
    assert "argument --wait" in done.stderr and "e.g. --wait 300" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--watch", "inf"], "argument --watch"),  # was a traceback (sleep(inf))
        (["--watch", "nan"], "argument --watch"),
        (["--watch", "1", "--count", "0"], "argument --count"),  # was exit 4 with no output
        (["--watch", "1", "--count", "-2"], "argument --count"),
    ],
)
def test_bad_watch_or_count_is_a_usage_error(tmp_path: Path, args: list[str], says: str) -> None:
    done = status(tmp_path, *args)
    assert done.returncode == 2, done
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_wait_and_watch_do_not_combine(tmp_path: Path) -> None:
    done = status(tmp_path, "--wait", "5", "--watch", "1")
    assert done.returncode == 2, done
    assert "--watch" in done.stderr and "--wait" in done.stderr, done.stderr
