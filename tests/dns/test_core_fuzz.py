"""Fuzz the packet path in-process: >100k random and mutated packets through the core, TCP and
UDP limits, and through the forwarding path; nothing may raise, every reply must be a
well-formed answer to the packet that caused it, and the core must still answer afterwards."""

from __future__ import annotations

import random

import dnslib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmagent.dns.answers import parse_upstream_reply
from vmagent.dns.core import DnsCore, Forward
from vmagent.dns.table import TableScope, build_lookup, parse_name_table

PACKETS_PER_EXAMPLE = 250
EXAMPLES = 450  # 450 * 250 = 112,500 packets


def _seeds() -> list[bytes]:
    seeds = []
    for name, qtype in [
        ("productpage", "A"),
        ("productpage.ns1.svc.cluster.local.ns1.svc.cluster.local", "AAAA"),
        ("x.wild.example.com", "A"),
        ("www.example.org", "MX"),
        ("big.example.com", "A"),
    ]:
        record = dnslib.DNSRecord.question(name, qtype)
        seeds.append(bytes(record.pack()))
        record.add_ar(dnslib.EDNS0(udp_len=4096, flags="do"))
        seeds.append(bytes(record.pack()))
    return seeds


SEEDS = _seeds()


def _core() -> DnsCore:
    core = DnsCore()
    table = parse_name_table(
        {
            "table": {
                "productpage.ns1.svc.cluster.local": {
                    "ips": ["9.9.9.9", "2001:db8::9"],
                    "registry": "Kubernetes",
                    "shortname": "productpage",
                    "namespace": "ns1",
                },
                "*.wild.example.com": {"ips": ["1.2.3.4"], "registry": "External"},
                "big.example.com": {
                    "ips": [f"10.0.0.{i}" for i in range(1, 120)],
                    "registry": "External",
                },
            }
        }
    )
    core.set_lookup(build_lookup(table, TableScope("ns1", search=("ns1.svc.cluster.local",))), 0)
    return core


def _mutate(rng: random.Random, packet: bytes) -> bytes:
    data = bytearray(packet)
    for _ in range(rng.randint(1, 4)):
        action = rng.randrange(5)
        if action == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif action == 1:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif action == 2 and data:
            del data[rng.randrange(len(data)) :]
        elif action == 3 and len(data) > 12:
            data[rng.randrange(2, 12)] ^= 1 << rng.randrange(8)
        else:
            data += rng.randbytes(rng.randrange(1, 40))
    return bytes(data)


def _check(core: DnsCore, packet: bytes, now: float, tcp: bool) -> None:
    result = core.handle(packet, now, tcp)
    if result is None:
        return
    if isinstance(result, Forward):
        sent = core.upstream_query(result, 1)
        assert parse_upstream_reply(b"", sent) is None
        result = core.render(core.complete(result, None, now), result.query, now, tcp)
    assert len(result) >= 12 and result[:2] == packet[:2] and result[2] & 0x80
    if not tcp:
        assert len(result) <= 65535


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32 - 1), raw=st.binary(max_size=600), tcp=st.booleans())
def test_no_packet_breaks_the_core(seed: int, raw: bytes, tcp: bool) -> None:
    rng = random.Random(seed)
    core = CORE
    _check(core, raw, 0.0, tcp)
    for i in range(PACKETS_PER_EXAMPLE):
        if i % 5 == 0:
            packet = rng.randbytes(rng.randrange(0, 80))
        else:
            packet = _mutate(rng, rng.choice(SEEDS))
        _check(core, packet, float(i), tcp)


CORE = _core()


def test_core_still_answers_after_the_fuzzing() -> None:
    reply = CORE.handle(SEEDS[0], 0.0, False)
    assert isinstance(reply, bytes)
    parsed = dnslib.DNSRecord.parse(reply)
    assert [str(rr.rdata) for rr in parsed.rr] == ["9.9.9.9"]
