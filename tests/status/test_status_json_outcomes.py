"""``vmagent status --json``: every outcome prints exactly one JSON document on stdout, also
when the agent cannot be asked (not running: exit 3, state ``not_running``; no status
document: exit 4, state ``unknown``), with or without ``--wait``; ``--count`` without
``--watch`` is a usage error naming ``--count``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_status_command import status


def one_document(stdout: str) -> dict[str, object]:
    """stdout as exactly one JSON object (json.loads refuses trailing data)."""
    document = json.loads(stdout)
    assert isinstance(document, dict), stdout
    return document


@pytest.mark.parametrize("extra", [(), ("--wait", "1")])
def test_not_running_prints_one_document(tmp_path: Path, extra: tuple[str, ...]) -> None:
    done = status(tmp_path, "--json", *extra)
    assert done.returncode == 3, done
    document = one_document(done.stdout)
    assert document["schema_version"] == 1 and document["state"] == "not_running", document
    assert "status.sock: no socket" in str(document["error"]), document
    assert "not running" in done.stderr  # the words for people stay on stderr


@pytest.fixture
def not_vmagent() -> Iterator[str]:
    """HOST:PORT of an HTTP server that is not a vmagent (404 to everything)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

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


@pytest.mark.parametrize("extra", [(), ("--wait", "1")])
def test_unknown_prints_one_document(
    tmp_path: Path, not_vmagent: str, extra: tuple[str, ...]
) -> None:
    done = status(tmp_path, "--json", "--addr", not_vmagent, *extra)
    assert done.returncode == 4, done
    document = one_document(done.stdout)
    assert document["schema_version"] == 1 and document["state"] == "unknown", document
    assert "HTTP 404" in str(document["error"]), document


def test_watch_prints_one_document_per_round(tmp_path: Path) -> None:
    done = status(tmp_path, "--json", "--watch", "0.1", "--count", "2")
    assert done.returncode == 3, done
    decoder, text, found = json.JSONDecoder(), done.stdout.strip(), []
    while text:
        document, end = decoder.raw_decode(text)
        found.append(document)
        text = text[end:].strip()
    assert [d["state"] for d in found] == ["not_running", "not_running"], done.stdout


def test_count_without_watch_is_a_usage_error(tmp_path: Path) -> None:
    done = status(tmp_path, "--count", "2")
    assert done.returncode == 2, done
    assert "usage:" in done.stderr and "--count" in done.stderr.splitlines()[-1], done.stderr
    assert "--watch" in done.stderr.splitlines()[-1] and done.stdout == ""
