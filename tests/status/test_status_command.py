"""``vmagent status`` as a process, against a real HTTP endpoint on loopback: a bad ``--addr``
is a usage error naming the flag (exit 2, no traceback), and a ``VMAGENT_STATUS_ADDR`` set in
the environment or cluster.env is asked when the Unix socket does not answer (an agent run by
hand, e.g. ``vmagent dev``), while the default 127.0.0.1:15020 is never asked on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from loopback import free_port

from vmagent.config import CLUSTER_ENV_VAR, DYNAMIC_PREFIXES, env_key, settings

DOC = {"schema_version": 1, "state": "healthy", "problems": []}


def status(tmp: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """``vmagent status ARGS`` with no vmagent setting from the caller's shell; the run dir
    is ``tmp`` (no socket there: the systemd agent is not running)."""
    keys = {env_key(f) for f in settings()} | {CLUSTER_ENV_VAR}
    env = {
        k: v for k, v in os.environ.items() if k not in keys and not k.startswith(DYNAMIC_PREFIXES)
    }
    env.update(VMAGENT_RUN_DIR=str(tmp), VMAGENT_CONFIG_DIR=str(tmp), **extra)
    return subprocess.run(
        [sys.executable, "-m", "vmagent", "status", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def agent() -> Iterator[str]:
    """A stand-in for the agent's TCP status endpoint: HOST:PORT answering /status?v=1."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(DOC).encode() if self.path == "/status?v=1" else b"{}"
            self.send_response(200 if self.path == "/status?v=1" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("addr", "says"),
    [
        ("bogus", "no port"),
        ("127.0.0.1:", "empty port"),
        ("127.0.0.1:99999", "1 and 65535"),
        ("127.0.0.1:http", "1 and 65535"),
    ],
)
def test_bad_addr_is_a_usage_error_naming_the_flag(tmp_path: Path, addr: str, says: str) -> None:
    done = status(tmp_path, "--addr", addr)
    assert done.returncode == 2, done
    assert "argument --addr" in done.stderr and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_addr_asks_that_endpoint(tmp_path: Path, agent: str) -> None:
    done = status(tmp_path, "--json", "--addr", agent)
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["state"] == "healthy"


def test_explicit_status_addr_in_environment_is_asked(tmp_path: Path, agent: str) -> None:
    done = status(tmp_path, "--json", VMAGENT_STATUS_ADDR=agent)
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["state"] == "healthy"


def test_explicit_status_addr_in_cluster_env_is_asked(tmp_path: Path, agent: str) -> None:
    cluster_env = tmp_path / "cluster.env"
    cluster_env.write_text(f"VMAGENT_STATUS_ADDR={agent}\n")
    done = status(tmp_path, "--json", "--cluster-env", str(cluster_env))
    assert done.returncode == 0, done


def test_not_running_names_both_places(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    done = status(tmp_path, VMAGENT_STATUS_ADDR=dead)
    assert done.returncode == 3, done
    assert f"{tmp_path}/status.sock: no socket" in done.stderr, done.stderr
    assert f"{dead}: connection refused (VMAGENT_STATUS_ADDR)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_default_status_addr_is_not_asked(tmp_path: Path) -> None:
    done = status(tmp_path)
    assert done.returncode == 3, done
    assert "15020" not in done.stderr and "status.sock: no socket" in done.stderr
