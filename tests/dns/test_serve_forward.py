"""Forwarding: unknown names go upstream; failures, fallback, parallel, resolv.conf."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.rcode
import dns.rdatatype
import pytest
from dnsfixtures import (
    HUGE_COUNT,
    LOOPBACK,
    Blackhole,
    DelayRelay,
    Dnsmasq,
    DnsServer,
    ServerFactory,
    addresses,
    answer_records,
    dig,
    free_port,
    port_free,
    start_upstream,
    tcp,
    udp,
    wait_until,
    write_resolv_conf,
)

pytestmark = pytest.mark.timeout(90)

FAST_FAIL = {"VMAGENT_DNS_ATTEMPT_TIMEOUT": "300ms", "DNS_FORWARD_TIMEOUT": "2s"}

_next_host = iter(range(0, 60))


def fresh_host() -> str:
    """A name the upstream knows (one A record) that no other test in this module asks for."""
    return f"h{next(_next_host)}.up.test."


@pytest.fixture(scope="module")
def srv(serve_module: ServerFactory) -> DnsServer:
    return serve_module.start()


def test_unknown_name_forwarded_udp_and_tcp(srv: DnsServer, upstream: Dnsmasq) -> None:
    direct = udp(upstream, "www.up.test.", "A")
    for msg in (udp(srv, "www.up.test.", "A"), tcp(srv, "www.up.test.", "A")):
        assert msg.rcode() == dns.rcode.NOERROR
        assert addresses(msg) == addresses(direct) == ["10.0.0.1"]


@pytest.mark.parametrize("rdtype", ["TXT", "MX"])
def test_other_qtypes_forwarded(srv: DnsServer, rdtype: str) -> None:
    msg = udp(srv, "www.up.test.", rdtype)
    assert msg.rcode() == dns.rcode.NOERROR
    texts = [r[3] for r in answer_records(msg)]
    assert texts == (['"hello upstream"'] if rdtype == "TXT" else ["10 mail.up.test."])


def test_nxdomain_relayed_with_soa(srv: DnsServer) -> None:
    name = f"nx-{uuid.uuid4().hex[:8]}.up.test."
    msg = udp(srv, name, "A")
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert msg.answer == []
    assert [rrset.rdtype for rrset in msg.authority] == [dns.rdatatype.SOA]


def test_upstream_answer_for_table_name_not_used(srv: DnsServer) -> None:
    # The upstream has productpage...cluster.local A 7.7.7.7; the table's 9.9.9.9 wins.
    assert addresses(udp(srv, "productpage.ns1.svc.cluster.local.", "A")) == ["9.9.9.9"]


def test_upstream_closed_port_is_servfail_but_table_still_answers(serve: ServerFactory) -> None:
    dead = f"{LOOPBACK}:{free_port()}"
    srv = serve.start(upstreams=[dead], env=FAST_FAIL)
    for msg in (udp(srv, "www.up.test.", "A"), tcp(srv, "www.up.test.", "A")):
        assert msg.rcode() == dns.rcode.SERVFAIL
    assert addresses(udp(srv, "productpage.", "A")) == ["9.9.9.9"]


def test_all_upstreams_silent_is_servfail(serve: ServerFactory) -> None:
    holes = [Blackhole(), Blackhole()]
    try:
        srv = serve.start(upstreams=[h.address for h in holes], env=FAST_FAIL)
        msg = udp(srv, "www.up.test.", "A", timeout=10)
        assert msg.rcode() == dns.rcode.SERVFAIL
        # The server is not wedged: table answers still come.
        assert addresses(udp(srv, "productpage.", "A")) == ["9.9.9.9"]
    finally:
        for hole in holes:
            hole.close()


def test_fallback_to_working_upstream(serve: ServerFactory, upstream: Dnsmasq) -> None:
    hole = Blackhole()
    dead = f"{LOOPBACK}:{free_port()}"
    try:
        srv = serve.start(upstreams=[hole.address, dead, upstream.address], env=FAST_FAIL)
        # Servers may be tried in any order: every name still resolves.
        for _ in range(4):
            name = fresh_host()
            msg = udp(srv, name, "A", timeout=10)
            assert msg.rcode() == dns.rcode.NOERROR, name
            assert len(addresses(msg)) == 1
    finally:
        hole.close()


@pytest.fixture
def two_upstreams(tmp_path: Path) -> Iterator[tuple[Dnsmasq, Dnsmasq]]:
    first = start_upstream(tmp_path / "u1")
    second = start_upstream(tmp_path / "u2")
    yield first, second
    first.stop()
    second.stop()


def test_sequential_first_good_answer_wins(
    serve: ServerFactory, two_upstreams: tuple[Dnsmasq, Dnsmasq]
) -> None:
    first, second = two_upstreams
    srv = serve.start(upstreams=[first.address, second.address])
    names = [f"h{300 + i}.up.test." for i in range(6)]
    for name in names:
        assert len(addresses(udp(srv, name, "A"))) == 1
    for name in names:
        # One good answer is enough: the other server is never asked.
        assert first.count(name) + second.count(name) == 1, name


@pytest.mark.parametrize("how", ["flag", "env"])
def test_parallel_asks_every_upstream(
    serve: ServerFactory, two_upstreams: tuple[Dnsmasq, Dnsmasq], how: str
) -> None:
    first, second = two_upstreams
    if how == "flag":
        srv = serve.start(upstreams=[first.address, second.address], extra=["--parallel"])
    else:
        srv = serve.start(
            upstreams=[first.address, second.address], env={"DNS_FORWARD_PARALLEL": "true"}
        )
    names = [f"h{310 + i + (10 if how == 'env' else 0)}.up.test." for i in range(3)]
    for name in names:
        assert len(addresses(udp(srv, name, "A"))) == 1
    for name in names:
        assert wait_until(lambda n=name: first.count(n) == 1 and second.count(n) == 1, 5), name


def test_parallel_answers_despite_silent_upstream(serve: ServerFactory, upstream: Dnsmasq) -> None:
    hole = Blackhole()
    try:
        srv = serve.start(
            upstreams=[hole.address, upstream.address],
            extra=["--parallel"],
            env={"VMAGENT_DNS_ATTEMPT_TIMEOUT": "3s", "DNS_FORWARD_TIMEOUT": "4s"},
        )
        for _ in range(3):
            msg = udp(srv, fresh_host(), "A", timeout=10)
            assert msg.rcode() == dns.rcode.NOERROR
    finally:
        hole.close()


@pytest.fixture
def refuser(tmp_path: Path) -> Iterator[Dnsmasq]:
    """A dnsmasq authoritative for other.test only: REFUSED for every up.test name."""
    args = ["--auth-zone=other.test", f"--auth-server=ns.other.test,{LOOPBACK}"]
    args += ["--host-record=x.other.test,10.6.0.1"]
    server = Dnsmasq.start(tmp_path / "refuser", args, probe="x.other.test.")
    yield server
    server.stop()


@pytest.mark.parametrize("parallel", [False, True])
def test_refused_from_one_upstream_is_not_the_answer(
    serve: ServerFactory, upstream: Dnsmasq, refuser: Dnsmasq, parallel: bool
) -> None:
    assert udp(refuser, "www.up.test.", "A").rcode() == dns.rcode.REFUSED
    srv = serve.start(
        upstreams=[refuser.address, upstream.address],
        extra=["--parallel"] if parallel else [],
    )
    for i in range(4):
        name = f"h{370 + i + (10 if parallel else 0)}.up.test."
        msg = udp(srv, name, "A")
        assert msg.rcode() == dns.rcode.NOERROR, "the good upstream's answer wins over REFUSED"
        assert len(addresses(msg)) == 1


def test_upstream_is_asked_with_edns_and_large_buffer(
    serve: ServerFactory, upstream: Dnsmasq
) -> None:
    relay = DelayRelay((upstream.host, upstream.port), 0.0)
    try:
        srv = serve.start(upstreams=[relay.address])
        name = fresh_host()
        msg = udp(srv, name, "A", edns=False)  # the client itself does not use EDNS
        assert len(addresses(msg)) == 1
        assert msg.edns < 0, "no OPT in the reply when the query had none"
        sent = relay.queries_for(name)
        assert sent, "query did not reach the upstream"
        assert all(q.edns >= 0 and q.payload >= 1232 for q in sent), [
            (q.edns, q.payload) for q in sent
        ]
    finally:
        relay.close()


def test_big_upstream_answer_not_servfail_for_plain_client(srv: DnsServer) -> None:
    # istio/istio#61371: upstream answers over 512 bytes must not become SERVFAIL.
    msg = udp(srv, "medium.up.test.", "A", edns=False)
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.TC
    msg = tcp(srv, "medium.up.test.", "A", edns=False)
    assert msg.rcode() == dns.rcode.NOERROR
    assert len(addresses(msg)) == 40


def test_truncated_udp_upstream_answer_retried_over_tcp(
    serve: ServerFactory, upstream: Dnsmasq
) -> None:
    # huge.up.test (~4.9 kB) never fits the upstream's UDP answers (edns-packet-max 4096).
    relay = DelayRelay((upstream.host, upstream.port), 0.0)
    try:
        srv = serve.start(upstreams=[relay.address])
        msg = udp(srv, "huge.up.test.", "A", edns=0, payload=4096)
        assert msg.rcode() == dns.rcode.NOERROR, "a truncated upstream answer is no failure"
        assert relay.queries_for("huge.up.test.", tcp=True), "no TCP retry towards upstream"
        full = tcp(srv, "huge.up.test.", "A")
        assert len(addresses(full)) == HUGE_COUNT
    finally:
        relay.close()


def test_total_forward_timeout_bounds_the_wait(serve: ServerFactory) -> None:
    hole = Blackhole()
    try:
        srv = serve.start(
            upstreams=[hole.address],
            env={"VMAGENT_DNS_ATTEMPT_TIMEOUT": "30s", "DNS_FORWARD_TIMEOUT": "1s"},
        )
        # With only the 30 s attempt timeout this client would give up first.
        msg = udp(srv, "www.up.test.", "A", timeout=10)
        assert msg.rcode() == dns.rcode.SERVFAIL
    finally:
        hole.close()


def test_dig_forwarded(srv: DnsServer, dig_tool: None) -> None:
    assert dig(srv, "+short", "www.up.test").split() == ["10.0.0.1"]
    assert dig(srv, "+short", "+tcp", "www.up.test", "TXT").strip() == '"hello upstream"'
    out = dig(srv, "nx.up.test")
    assert "status: NXDOMAIN" in out and "SOA" in out
    assert "status: NOERROR" in dig(srv, "+tcp", "v6.up.test", "AAAA")


# --- resolv.conf ---------------------------------------------------------------------------

RESOLV_A = "127.0.0.153"
RESOLV_B = "127.0.0.154"


@pytest.fixture
def port53_upstreams(tmp_path: Path) -> Iterator[tuple[Dnsmasq, Dnsmasq]]:
    if not (port_free(RESOLV_A, 53) and port_free(RESOLV_B, 53)):
        pytest.skip("127.0.0.153:53 / 127.0.0.154:53 not free (or not root)")
    a = start_upstream(tmp_path / "ra", host=RESOLV_A, port=53)
    try:
        b = start_upstream(tmp_path / "rb", host=RESOLV_B, port=53)
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def test_resolv_conf_nameservers_used_and_reread(
    serve: ServerFactory, tmp_path: Path, port53_upstreams: tuple[Dnsmasq, Dnsmasq]
) -> None:
    a, b = port53_upstreams
    resolv = write_resolv_conf(tmp_path / "resolv.conf", [RESOLV_A], ["ns1.svc.cluster.local"])
    srv = serve.start(upstreams=[], resolv_conf=resolv, search=None)
    name = "h330.up.test."
    assert len(addresses(udp(srv, name, "A"))) == 1
    assert a.count(name) == 1 and b.count(name) == 0
    # search list from resolv.conf: first search domain expanded
    msg = udp(srv, "productpage.ns1.ns1.svc.cluster.local.", "A")
    assert [r[1] for r in answer_records(msg)] == ["CNAME", "A"]

    write_resolv_conf(resolv, [RESOLV_B], ["ns1.svc.cluster.local"])
    counter = iter(range(331, 360))

    def switched() -> bool:
        probe = f"h{next(counter)}.up.test."
        udp(srv, probe, "A")
        return b.count(probe) == 1

    assert wait_until(switched, 10, 0.5), "resolv.conf change not picked up within 10 s"
    name = "h360.up.test."
    assert len(addresses(udp(srv, name, "A"))) == 1
    assert a.count(name) == 0 and b.count(name) == 1


def test_upstream_without_port_means_53(
    serve: ServerFactory, port53_upstreams: tuple[Dnsmasq, Dnsmasq]
) -> None:
    a, _ = port53_upstreams
    srv = serve.start(upstreams=[RESOLV_A])
    name = "h361.up.test."
    assert len(addresses(udp(srv, name, "A"))) == 1
    assert a.count(name) == 1
