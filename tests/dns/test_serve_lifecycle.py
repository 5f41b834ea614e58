"""Start-up, reload and listening: table file missing/malformed/changing, SIGHUP, log lines,
listen addresses and the non-loopback guard."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import dns.flags
import dns.rcode
import pytest
from dnsfixtures import (
    LOOPBACK,
    TABLE,
    UPSTREAM_TABLE_NAME_IP,
    Dnsmasq,
    DnsServer,
    ServerFactory,
    addresses,
    free_port,
    port_free,
    serve_argv,
    server_env,
    tcp,
    udp,
    wait_until,
    write_resolv_conf,
    write_table,
)

pytestmark = pytest.mark.timeout(60)

NAME = "productpage.ns1.svc.cluster.local."


def table_with(ip: str) -> dict[str, Any]:
    table = json.loads(json.dumps(TABLE))
    table["table"]["productpage.ns1.svc.cluster.local"]["ips"] = [ip]
    return table


def external_table(count: int) -> dict[str, Any]:
    """``count`` non-Kubernetes entries: table size == number of names, however counted."""
    return {
        "table": {
            f"svc{i}.size.example.com": {"ips": [f"10.8.0.{i + 1}"], "registry": "External"}
            for i in range(count)
        }
    }


def answers(server: DnsServer, name: str = NAME) -> list[str]:
    return addresses(udp(server, name, "A"))


def test_table_file_change_is_reloaded(serve: ServerFactory, tmp_path: Path) -> None:
    path = write_table(tmp_path / "table.json", table_with("9.9.9.9"))
    srv = serve.start(name_table=path)
    assert answers(srv) == ["9.9.9.9"]
    write_table(path, table_with("9.9.9.10"))
    assert wait_until(lambda: answers(srv) == ["9.9.9.10"], 10), "file change not picked up"
    # rewritten in place (same inode) as well
    path.write_text(json.dumps(table_with("9.9.9.11")))
    assert wait_until(lambda: answers(srv) == ["9.9.9.11"], 10), "in-place write not picked up"
    # a name removed from the table goes upstream again (which says 7.7.7.7)
    smaller = table_with("9.9.9.11")
    del smaller["table"]["productpage.ns1.svc.cluster.local"]
    write_table(path, smaller)
    assert wait_until(lambda: answers(srv) == [UPSTREAM_TABLE_NAME_IP], 10), srv.output()
    assert "9.9.9.11" not in answers(srv, "productpage.")


def test_sighup_reloads(serve: ServerFactory, tmp_path: Path) -> None:
    path = write_table(tmp_path / "table.json", table_with("9.9.9.9"))
    srv = serve.start(name_table=path)
    assert answers(srv) == ["9.9.9.9"]
    stat = path.stat()
    # Same size, same mtime: only SIGHUP can reveal the change.
    path.write_text(json.dumps(table_with("9.9.9.8"), indent=1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    srv.signal(signal.SIGHUP)
    assert wait_until(lambda: answers(srv) == ["9.9.9.8"], 5), "SIGHUP did not reload"
    assert srv.alive()


def test_bad_file_on_reload_keeps_old_table(serve: ServerFactory, tmp_path: Path) -> None:
    path = write_table(tmp_path / "table.json", table_with("9.9.9.9"))
    srv = serve.start(name_table=path)
    before = srv.output()
    for bad in ('{"table": {"x": {"ips": ["not-an-ip"]}}', "{ not json", '{"table": 5}'):
        path.write_text(bad)
        srv.signal(signal.SIGHUP)
        assert wait_until(lambda b=before: len(srv.output()) > len(b), 5), "reload not logged"
        time.sleep(1.5)  # give the file poller a turn as well
        assert srv.alive()
        assert answers(srv) == ["9.9.9.9"], f"old table must keep answering after {bad!r}"
        before = srv.output()
    assert re.search(r"(?i)error|invalid|fail|cannot|bad", before), before
    write_table(path, table_with("9.9.9.12"))
    assert wait_until(lambda: answers(srv) == ["9.9.9.12"], 10), "good file after bad one"


def test_log_line_with_table_size_on_start_and_reload(serve: ServerFactory, tmp_path: Path) -> None:
    path = write_table(tmp_path / "table.json", external_table(3))
    srv = serve.start(name_table=path, search=[], probe="svc0.size.example.com.")

    def size_lines(count: int) -> list[str]:
        return [ln for ln in srv.output().splitlines() if re.search(rf"\b{count}\b", ln)]

    assert wait_until(lambda: len(size_lines(3)) >= 1, 5), srv.output()
    write_table(path, external_table(5))
    assert wait_until(lambda: answers(srv, "svc4.size.example.com.") == ["10.8.0.5"], 10)
    assert wait_until(lambda: len(size_lines(5)) >= 1, 5), srv.output()
    srv.signal(signal.SIGHUP)
    assert wait_until(lambda: len(size_lines(5)) >= 2, 5), "no log line for the SIGHUP reload"


def test_missing_table_forwards_until_file_appears(
    serve: ServerFactory, tmp_path: Path, upstream: Dnsmasq
) -> None:
    path = tmp_path / "later" / "table.json"
    srv = serve.start(name_table=path, probe="www.up.test.")
    srv.signal(signal.SIGHUP)  # a reload request without a file changes nothing
    # Before the table: everything upstream (istio/istio#43276), the table name too.
    msg = udp(srv, NAME, "A")
    assert msg.rcode() == dns.rcode.NOERROR
    assert addresses(msg) == [UPSTREAM_TABLE_NAME_IP]
    assert addresses(tcp(srv, "www.up.test.", "A")) == ["10.0.0.1"]
    assert "9.9.9.9" not in addresses(udp(srv, "productpage.", "A"))
    path.parent.mkdir()
    write_table(path, TABLE)
    # Once loaded, the table answers: no upstream answer cached earlier may shadow it.
    assert wait_until(lambda: answers(srv) == ["9.9.9.9"], 10), srv.output()
    msg = udp(srv, NAME, "A")
    assert msg.flags & dns.flags.AA
    assert answers(srv, "productpage.") == ["9.9.9.9"]


@pytest.mark.parametrize(
    "content", ["{ not json", '{"table": {"a.example.com": {"ips": ["999.1.1.1"]}}}', "[]"]
)
def test_malformed_table_at_start_exits_nonzero(
    tmp_path: Path, upstream: Dnsmasq, content: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    argv = serve_argv(
        path,
        listen=[(LOOPBACK, free_port())],
        upstreams=[upstream.address],
        resolv_conf=write_resolv_conf(tmp_path / "resolv.conf"),
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=_env())
    assert done.returncode != 0
    assert "bad.json" in done.stderr or "table" in done.stderr.lower(), done.stderr
    assert "Traceback" not in done.stderr, "a clear message, not a traceback"


@pytest.mark.parametrize("listen", ["0.0.0.0:{port}", "[::]:{port}"])
def test_non_loopback_listen_refused(tmp_path: Path, upstream: Dnsmasq, listen: str) -> None:
    path = write_table(tmp_path / "table.json")
    argv = serve_argv(
        path, upstreams=[upstream.address], resolv_conf=write_resolv_conf(tmp_path / "r.conf")
    )
    argv += ["--listen", listen.format(port=free_port())]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=_env())
    assert done.returncode == 2, done.stderr
    assert "loopback" in done.stderr.lower(), done.stderr
    assert "Traceback" not in done.stderr


def test_non_loopback_from_environment_refused(tmp_path: Path, upstream: Dnsmasq) -> None:
    path = write_table(tmp_path / "table.json")
    argv = serve_argv(
        path, upstreams=[upstream.address], resolv_conf=write_resolv_conf(tmp_path / "r.conf")
    )
    env = _env({"DNS_PROXY_ADDR": f"0.0.0.0:{free_port()}"})
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=env)
    assert done.returncode == 2, done.stderr
    assert "loopback" in done.stderr.lower()


def test_other_loopback_addresses_accepted(serve: ServerFactory) -> None:
    port = free_port("127.0.0.2")
    srv = serve.start(listen=[("127.0.0.2", port), ("::1", free_port("::1"))])
    for host, port in srv.listen:
        msg = udp(_at(srv, host, port), NAME, "A")
        assert addresses(msg) == ["9.9.9.9"]
        assert addresses(tcp(_at(srv, host, port), NAME, "A")) == ["9.9.9.9"]


def test_listen_from_environment(serve: ServerFactory, tmp_path: Path) -> None:
    port = free_port()
    path = write_table(tmp_path / "table.json")
    srv = serve.start(
        name_table=path, listen=[], env={"DNS_PROXY_ADDR": f"127.0.0.1:{port}"}, probe=None
    )
    srv.listen = [(LOOPBACK, port)]
    srv.wait_ready(NAME)
    assert answers(srv) == ["9.9.9.9"]


def test_listen_localhost_means_both_loopbacks(serve: ServerFactory) -> None:
    port = free_port()
    if not port_free("::1", port):
        pytest.skip("port taken on ::1")
    srv = serve.start(listen=[], extra=["--listen", f"localhost:{port}"], probe=None)
    srv.listen = [("127.0.0.1", port), ("::1", port)]
    srv.wait_ready(NAME)
    for host, port in srv.listen:
        assert addresses(udp(_at(srv, host, port), NAME)) == ["9.9.9.9"]


def test_default_listen_addresses(serve: ServerFactory) -> None:
    if not (port_free("127.0.0.1", 15053) and port_free("::1", 15053)):
        pytest.skip("port 15053 is in use on this machine")
    srv = serve.start(listen=[], probe=None)
    srv.listen = [("127.0.0.1", 15053), ("::1", 15053)]
    srv.wait_ready(NAME)
    for host, port in srv.listen:
        assert addresses(udp(_at(srv, host, port), NAME)) == ["9.9.9.9"]
        assert addresses(tcp(_at(srv, host, port), NAME)) == ["9.9.9.9"]


def test_sigterm_exits_promptly(serve: ServerFactory) -> None:
    srv = serve.start()
    srv.signal(signal.SIGTERM)
    try:
        code = srv.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail("still running 10 s after SIGTERM")
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


def _at(server: DnsServer, host: str, port: int) -> DnsServer:
    return DnsServer(server.proc, [(host, port)], server.stderr_path)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return server_env(extra)
