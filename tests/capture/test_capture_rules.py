"""The pure core: rules equal Istio's istio-iptables output (its own golden files, copied from
tools/istio-iptables/pkg/capture/testdata with the settings run_test.go gives them), the
restore transaction is idempotent and clean removes exactly vmagent's chains and hooks,
resolv.conf parsing, and the fail-open switch."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vmagent.capture.rules import (
    DNS,
    DNS_IN,
    CaptureSpec,
    RuleSet,
    build,
    nameservers,
    parse_save,
    restore_text,
)
from vmagent.capture.watch import FailOpen

GOLDEN = Path(__file__).parent.parent / "fixtures" / "istio-iptables"
UG = {"proxy_uids": ("3", "4"), "proxy_gids": ("1", "2")}

# golden name -> (our spec, whether Istio's case has EnableIPv6), from run_test.go.
CASES: dict[str, tuple[CaptureSpec, bool]] = {
    "empty": (CaptureSpec(), False),
    "ipnets": (CaptureSpec(service_cidrs=("10.0.0.0/8",)), False),
    "inbound-ports-include": (CaptureSpec(inbound_ports=("32000", "31000")), False),
    "inbound-ports-wildcard": (CaptureSpec(inbound_ports=("*",)), False),
    "outbound-ports-include": (CaptureSpec(outbound_ports=("32000", "31000")), False),
    "ip-range": (
        CaptureSpec(
            **UG,
            dns_capture=True,
            nameservers=("127.0.0.53",),
            service_cidrs=("9.9.0.0/16",),
            service_exclude_cidrs=("1.1.0.0/16",),
        ),
        False,
    ),
    "loopback-outbound-iprange": (
        CaptureSpec(
            **UG, dns_capture=True, nameservers=("127.0.0.53",), service_cidrs=("127.1.2.3/32",)
        ),
        False,
    ),
    "dns-uid-gid": (
        CaptureSpec(**UG, dns_capture=True, nameservers=("127.0.0.53", "::127.0.0.53")),
        True,
    ),
    # DNS capture asked for, but no nameserver and no CAPTURE_ALL_DNS: Istio captures none.
    "ipv6-dns-uid-gid": (CaptureSpec(**UG, dns_capture=True), True),
    "ipv6-empty-inbound-ports": (CaptureSpec(), True),
    "ipv6-inbound-ports": (CaptureSpec(inbound_ports=("4000", "5000")), True),
    "ipv6-outbound-ports": (CaptureSpec(outbound_ports=("32000", "31000")), True),
}

RENAME = {
    ("nat", "ISTIO_INBOUND"): "VMAGENT_INBOUND",
    ("raw", "ISTIO_INBOUND"): DNS_IN,
    ("nat", "ISTIO_OUTPUT_DNS"): DNS,
    ("raw", "ISTIO_OUTPUT_DNS"): DNS,
    ("nat", "ISTIO_OUTPUT"): "VMAGENT_OUTPUT",
    ("nat", "ISTIO_REDIRECT"): "VMAGENT_REDIRECT",
    ("nat", "ISTIO_IN_REDIRECT"): "VMAGENT_IN_REDIRECT",
}

Shape = dict[tuple[str, str], list[str]]


def _golden(name: str, v6: bool) -> dict[int, Shape]:
    """{family: {(table, chain): ["-A" lines]}} of a golden file, chains renamed to ours."""
    blocks: list[tuple[str, list[str]]] = []
    for line in (GOLDEN / f"{name}.golden").read_text().splitlines():
        if line.startswith("* "):
            blocks.append((line[2:], []))
        elif line.startswith("-A ") and blocks:
            blocks[-1][1].append(line)
    halves = [blocks[: len(blocks) // 2], blocks[len(blocks) // 2 :]] if v6 else [blocks]
    found: dict[int, Shape] = {}
    for family, half in zip((4, 6), halves):
        shape: Shape = {}
        for table, lines in half:
            for line in lines:
                words = [RENAME.get((table, w), w) for w in line.split()[1:]]
                words = [_norm("--to-ports" if w == "--to-port" else w) for w in words]
                shape.setdefault((table, words[0]), []).append(" ".join(words[1:]))
        found[family] = shape
    return found


def _norm(word: str) -> str:
    """An address in Python's spelling (Istio writes ::127.0.0.53, Python ::7f00:35)."""
    try:
        return str(ipaddress.ip_network(word)) if "/" in word else word
    except ValueError:
        return word


def _ours(rs: RuleSet) -> Shape:
    shape: Shape = {}
    for table, chain, words in rs.rules:
        shape.setdefault((table, chain), []).append(" ".join(words))
    for table, builtin, chain, match in rs.hooks:
        shape.setdefault((table, builtin), []).append(" ".join([*match, "-j", chain]))
    return shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_capture_rules_equal_istio_golden(name: str) -> None:
    spec, v6 = CASES[name]
    for family, want in _golden(name, v6).items():
        assert _ours(build(spec, family)) == want, (name, family)


def test_capture_all_dns_matches_run_go() -> None:
    """CAPTURE_ALL_DNS: every port-53 query (no -d), zones without -d/-s (SetupDNSRedir)."""
    rs = build(CaptureSpec(dns_capture=True, capture_all_dns=True), 4)
    shape = _ours(rs)
    assert shape[("nat", DNS)] == [
        "-p tcp --dport 53 -j REDIRECT --to-ports 15053",
        "-p udp --dport 53 -j REDIRECT --to-ports 15053",
    ]
    assert "-p udp --dport 53 -j CT --zone 2" in shape[("raw", DNS)]
    assert shape[("raw", DNS_IN)] == ["-p udp --sport 53 -j CT --zone 1"]


def test_capture_exclusions() -> None:
    """ISTIO_LOCAL_EXCLUDE_PORTS with inbound '*', ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE (tcp
    and udp, first in the output chain), ISTIO_SERVICE_EXCLUDE_CIDR before the include."""
    spec = CaptureSpec(
        inbound_ports=("*",),
        inbound_exclude_ports=("22", "15090"),
        outbound_exclude_ports=("5432",),
        service_cidrs=("*",),
        service_exclude_cidrs=("10.1.0.0/16", "fd00::/8"),
    )
    v4, v6 = _ours(build(spec, 4)), _ours(build(spec, 6))
    assert v4[("nat", "VMAGENT_INBOUND")] == [
        "-p tcp --dport 15008 -j RETURN",
        "-p tcp --dport 22 -j RETURN",
        "-p tcp --dport 15090 -j RETURN",
        "-p tcp -j VMAGENT_IN_REDIRECT",
    ]
    out = v4[("nat", "VMAGENT_OUTPUT")]
    assert out[:2] == ["-p tcp --dport 5432 -j RETURN", "-p udp --dport 5432 -j RETURN"]
    assert out[-2:] == ["-d 10.1.0.0/16 -j RETURN", "-j VMAGENT_REDIRECT"]
    assert v6[("nat", "VMAGENT_OUTPUT")][-2:] == ["-d fd00::/8 -j RETURN", "-j VMAGENT_REDIRECT"]


def test_capture_fail_open_rules_have_no_dns_redirect() -> None:
    """dns_live=False: the rules with DNS capture off; loopback TCP/53 is left alone too."""
    spec = CaptureSpec(dns_capture=True, nameservers=("127.0.0.53",), service_cidrs=("*",))
    off, plain = build(spec, 4, dns_live=False), build(CaptureSpec(service_cidrs=("*",)), 4)
    assert _ours(off) == _ours(plain)
    assert all(DNS not in chains for chains in off.chains.values())


SAVE_BEFORE = """# Generated by iptables-save
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 9 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
-A OUTPUT -p tcp -m tcp --dport 9 -j RETURN
-A OUTPUT -j DOCKER
COMMIT
"""


def _saved_after(rs: RuleSet) -> str:
    """What iptables-save shows after applying ``rs`` on SAVE_BEFORE (chains and hooks)."""
    lines = SAVE_BEFORE.splitlines()
    for table in ("raw", "nat"):
        end = lines.index("COMMIT", lines.index(f"*{table}"))
        add = [f":{c} - [0:0]" for c in rs.chains.get(table, [])]
        add += [f"-A {h}" for h in rs.hook_lines(table)]
        lines[end:end] = add
    return "\n".join(lines)


def test_capture_restore_is_idempotent_and_clean_is_exact() -> None:
    spec = CaptureSpec(
        dns_capture=True, nameservers=("10.0.0.2",), inbound_ports=("8080",), service_cidrs=("*",)
    )
    rs = build(spec, 4)
    first = restore_text(parse_save(SAVE_BEFORE), rs)
    assert "-A OUTPUT -j VMAGENT_OUTPUT" in first
    assert "-A PREROUTING -p tcp -j VMAGENT_INBOUND" in first
    assert "-D" not in first and "-X" not in first and "DOCKER" not in first
    # Applied again: the chains are re-declared (flushed) and refilled, the hooks not re-added.
    again = restore_text(parse_save(_saved_after(rs)), rs)
    assert "-A OUTPUT -j" not in again and "-A PREROUTING" not in again
    assert again.count("-A VMAGENT_OUTPUT") == first.count("-A VMAGENT_OUTPUT")
    # Clean: exactly our hooks deleted, our chains flushed and deleted; nothing else named.
    clean = restore_text(parse_save(_saved_after(rs)), None)
    assert sorted(line for line in clean.splitlines() if line.startswith("-D")) == [
        "-D OUTPUT -j VMAGENT_DNS",
        "-D OUTPUT -j VMAGENT_OUTPUT",
        "-D PREROUTING -j VMAGENT_DNS_IN",
        "-D PREROUTING -p tcp -j VMAGENT_INBOUND",
    ]
    assert "DOCKER" not in clean and "--dport 9" not in clean
    assert {line for line in clean.splitlines() if line.startswith("-X")} == {
        f"-X {c}" for t in rs.chains for c in rs.chains[t]
    }
    assert restore_text(parse_save(SAVE_BEFORE), None) == ""  # nothing of ours: no-op


def test_capture_fail_open_switch_deletes_dns_chains() -> None:
    """Switching DNS off removes the DNS chains and hooks in the same transaction."""
    spec = CaptureSpec(dns_capture=True, nameservers=("10.0.0.2",))
    text = restore_text(parse_save(_saved_after(build(spec, 4))), build(spec, 4, dns_live=False))
    assert "-D OUTPUT -j VMAGENT_DNS" in text and "-X VMAGENT_DNS" in text
    assert "-D OUTPUT -j VMAGENT_OUTPUT" not in text and "REDIRECT --to-ports 15053" not in text


def test_capture_nameservers_from_resolv_conf() -> None:
    text = (
        "# systemd-resolved stub\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n"
        "nameserver bogus\n  nameserver 10.0.0.2 # comment\nnameserver 127.0.0.53\n"
        "search ns1.svc.cluster.local\n"
    )
    assert nameservers(text) == ("127.0.0.53", "fe80::1", "10.0.0.2")


def test_capture_fail_open_switch() -> None:
    """Off after 2 failed probes in a row, on again after 1 success; the first decides."""
    state = FailOpen(live=None)
    assert state.observe(True) is True
    assert state.observe(False) is None  # one miss: a blip, not a death
    assert state.observe(True) is None
    assert state.observe(False) is None
    assert state.observe(False) is False
    assert state.observe(False) is None
    assert state.observe(True) is True
