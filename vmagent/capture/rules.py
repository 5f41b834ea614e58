"""Pure core of traffic capture: settings -> iptables rules -> ``iptables-restore`` text.

Equivalent to Istio's VM capture (``tools/istio-iptables/pkg/capture/run.go``: ``Run``,
``SetupDNSRedir``, ``addDNSConntrackZones``; reference §3.6), in chains of vmagent's own
(``VMAGENT_*``) so that removing them removes exactly what was added. No I/O here: the shell
(:mod:`vmagent.capture.shell`) passes in ``iptables-save`` output and resolv.conf text.

A rule set is per address family (4 or 6): ``chains`` {table: [chain]}, ``rules`` in order
(table, chain, argv words) and ``hooks`` (table, built-in chain, our chain, match words):
the one ``-A <BUILTIN> [match] -j <OURS>`` rule that makes a chain live.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

OUTPUT, INBOUND, REDIRECT, IN_REDIRECT = (
    "VMAGENT_OUTPUT",
    "VMAGENT_INBOUND",
    "VMAGENT_REDIRECT",
    "VMAGENT_IN_REDIRECT",
)
DNS, DNS_IN = "VMAGENT_DNS", "VMAGENT_DNS_IN"
OUR_CHAINS = frozenset({OUTPUT, INBOUND, REDIRECT, IN_REDIRECT, DNS, DNS_IN})
TABLES = ("raw", "nat")
TUNNEL_PORT = "15008"  # Istio's HBONE port, never redirected (run.go)

Rule = tuple[str, str, tuple[str, ...]]  # (table, chain, words after "-A CHAIN")


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture (Istio env names in brackets). Ports and ids are decimal strings;
    ``service_cidrs``/``inbound_ports`` may be ``("*",)`` (everything)."""

    proxy_uids: tuple[str, ...] = ("1337",)  # [PROXY_UID]
    proxy_gids: tuple[str, ...] = ("1337",)  # [PROXY_GID]
    dns_capture: bool = False  # [ISTIO_META_DNS_CAPTURE]
    capture_all_dns: bool = False  # [CAPTURE_ALL_DNS]
    nameservers: tuple[str, ...] = ()  # from resolv.conf
    dns_port: str = "15053"  # the agent's DNS proxy
    outbound_port: str = "15001"  # Envoy's virtualOutbound
    inbound_port: str = "15006"  # [INBOUND_CAPTURE_PORT]
    service_cidrs: tuple[str, ...] = ()  # [ISTIO_SERVICE_CIDR]
    service_exclude_cidrs: tuple[str, ...] = ()  # [ISTIO_SERVICE_EXCLUDE_CIDR]
    inbound_ports: tuple[str, ...] = ()  # [ISTIO_INBOUND_PORTS]
    inbound_exclude_ports: tuple[str, ...] = ()  # [ISTIO_LOCAL_EXCLUDE_PORTS]
    outbound_ports: tuple[str, ...] = ()  # [ISTIO_OUTBOUND_PORTS]
    outbound_exclude_ports: tuple[str, ...] = ()  # [ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE]

    def dns_active(self) -> bool:
        """run.go: DNS capture needs CAPTURE_ALL_DNS or a resolv.conf nameserver."""
        return self.dns_capture and (self.capture_all_dns or bool(self.nameservers))


@dataclass
class RuleSet:
    """The rules of one address family (``family`` 4 or 6)."""

    family: int
    chains: dict[str, list[str]] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    hooks: list[tuple[str, str, str, tuple[str, ...]]] = field(default_factory=list)

    def chain(self, table: str, name: str) -> None:
        if name not in self.chains.setdefault(table, []):
            self.chains[table].append(name)

    def add(self, table: str, chain: str, *words: str) -> None:
        self.chain(table, chain)
        self.rules.append((table, chain, words))

    def hook(self, table: str, builtin: str, chain: str, *match: str) -> None:
        self.chain(table, chain)
        if (table, builtin, chain, match) not in self.hooks:
            self.hooks.append((table, builtin, chain, match))

    def hook_lines(self, table: str) -> list[str]:
        """This table's hooks as ``iptables-save`` prints them (after ``-A``)."""
        return [" ".join([b, *m, "-j", c]) for t, b, c, m in self.hooks if t == table]


def nameservers(resolv_conf: str) -> tuple[str, ...]:
    """The ``nameserver`` addresses of a resolv.conf text (glibc's syntax; ``%scope`` and
    malformed entries dropped), in order, without duplicates."""
    found: list[str] = []
    for line in resolv_conf.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                address = str(ipaddress.ip_address(words[1].split("%", 1)[0]))
            except ValueError:
                continue
            if address not in found:
                found.append(address)
    return tuple(found)


def _split(items: Iterable[str], family: int) -> list[str]:
    """The CIDRs of ``family`` (a bare address gets /32 or /128, as Istio's ``-d S/32``)."""
    return [
        str(net)
        for net in (ipaddress.ip_network(item, strict=False) for item in items)
        if net.version == family
    ]


def build(spec: CaptureSpec, family: int, dns_live: bool = True) -> RuleSet:
    """The rules for ``family`` (4 or 6), in run.go's order. ``dns_live`` False builds the
    rules as if DNS capture were off: the fail-open state while the agent's DNS proxy is down
    (docs/capture.md)."""
    rs = RuleSet(family)
    loopback = "127.0.0.1/32" if family == 4 else "::1/128"
    six = "127.0.0.6/32" if family == 4 else "::6/128"
    dns = spec.dns_active() and dns_live
    servers = _split(spec.nameservers, family)
    include = ["*"] if spec.service_cidrs == ("*",) else _split(spec.service_cidrs, family)
    # run.go: a loopback range in ISTIO_SERVICE_CIDR (either family) keeps loopback captured.
    loopback_included = spec.service_cidrs != ("*",) and any(
        ipaddress.ip_network(c, strict=False).network_address.is_loopback
        for c in spec.service_cidrs
    )

    rs.add("nat", INBOUND, "-p", "tcp", "--dport", TUNNEL_PORT, "-j", "RETURN")
    rs.add("nat", REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", spec.outbound_port)
    rs.add("nat", IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", spec.inbound_port)
    if spec.inbound_ports:
        rs.hook("nat", "PREROUTING", INBOUND, "-p", "tcp")
        if spec.inbound_ports == ("*",):
            for port in spec.inbound_exclude_ports:
                rs.add("nat", INBOUND, "-p", "tcp", "--dport", port, "-j", "RETURN")
            rs.add("nat", INBOUND, "-p", "tcp", "-j", IN_REDIRECT)
        else:
            for port in spec.inbound_ports:
                rs.add("nat", INBOUND, "-p", "tcp", "--dport", port, "-j", IN_REDIRECT)

    rs.hook("nat", "OUTPUT", OUTPUT)
    for port in spec.outbound_exclude_ports:
        rs.add("nat", OUTPUT, "-p", "tcp", "--dport", port, "-j", "RETURN")
        rs.add("nat", OUTPUT, "-p", "udp", "--dport", port, "-j", "RETURN")
    # Health probes come from 127.0.0.6 (reference §4.2): not captured.
    rs.add("nat", OUTPUT, "-o", "lo", "-s", six, "-j", "RETURN")
    not_dns = ["-m", "multiport", "!", "--dports", f"53,{TUNNEL_PORT}"]
    for kind, ids in (("--uid-owner", spec.proxy_uids), ("--gid-owner", spec.proxy_gids)):
        for owner in ids:
            # Envoy calling this host's own non-loopback address: inbound, as in run.go.
            skip = not_dns if dns and kind == "--uid-owner" else ["!", "--dport", TUNNEL_PORT]
            rs.add(
                "nat", OUTPUT, "-o", "lo", "!", "-d", loopback, "-p", "tcp", *skip,
                "-m", "owner", kind, owner, "-j", IN_REDIRECT,
            )  # fmt: skip
            # Other users' loopback traffic is left alone, except DNS over TCP (run.go).
            tcp_not_dns = ["-p", "tcp", "!", "--dport", "53"] if dns else []
            if not loopback_included:
                rs.add(
                    "nat", OUTPUT, "-o", "lo", *tcp_not_dns,
                    "-m", "owner", "!", kind, owner, "-j", "RETURN",
                )  # fmt: skip
            # The agent and Envoy are exempt, before the DNS jump: their own upstream
            # queries are never captured (no loop through a local stub; istio/istio#30309).
            rs.add("nat", OUTPUT, "-m", "owner", kind, owner, "-j", "RETURN")
    if dns:
        _dns_rules(rs, spec, servers)
    rs.add("nat", OUTPUT, "-d", loopback, "-j", "RETURN")
    for cidr in _split(spec.service_exclude_cidrs, family):
        rs.add("nat", OUTPUT, "-d", cidr, "-j", "RETURN")
    for port in spec.outbound_ports:
        rs.add("nat", OUTPUT, "-p", "tcp", "--dport", port, "-j", REDIRECT)
    for cidr in include:
        rs.add("nat", OUTPUT, *([] if cidr == "*" else ["-d", cidr]), "-j", REDIRECT)
    return rs


def _dns_rules(rs: RuleSet, spec: CaptureSpec, servers: Sequence[str]) -> None:
    """SetupDNSRedir + addDNSConntrackZones (run.go; reference §3.6)."""
    rs.hook("raw", "OUTPUT", DNS)
    if spec.capture_all_dns or servers:
        rs.add("nat", OUTPUT, "-j", DNS)
    targets = [[]] if spec.capture_all_dns else [["-d", s] for s in servers]
    for proto in ("tcp", "udp"):
        for dest in targets:
            rs.add(
                "nat", DNS, "-p", proto, "--dport", "53", *dest,
                "-j", "REDIRECT", "--to-ports", spec.dns_port,
            )  # fmt: skip
    # Conntrack zones keep the app's query (zone 2 to the nameserver, redirected) apart from
    # the agent's own upstream query (zone 1) with the same 5-tuple (istio/istio#33469).
    for kind, ids in (("--uid-owner", spec.proxy_uids), ("--gid-owner", spec.proxy_gids)):
        for owner in ids:
            rs.add("raw", DNS, "-p", "udp", "--dport", "53", "-m", "owner", kind, owner,
                   "-j", "CT", "--zone", "1")  # fmt: skip
            rs.add("raw", DNS, "-p", "udp", "--sport", spec.dns_port, "-m", "owner", kind,
                   owner, "-j", "CT", "--zone", "2")  # fmt: skip
    if spec.capture_all_dns or servers:
        rs.hook("raw", "PREROUTING", DNS_IN)
    for dest in targets:
        source = ["-s", dest[1]] if dest else []
        rs.add("raw", DNS, "-p", "udp", "--dport", "53", *dest, "-j", "CT", "--zone", "2")
        rs.add("raw", DNS_IN, "-p", "udp", "--sport", "53", *source, "-j", "CT", "--zone", "1")


@dataclass(frozen=True)
class Saved:
    """What ``iptables-save`` shows of vmagent's rules: our chains per table, and the saved
    text (after ``-A``) of every built-in chain rule that jumps to one of them."""

    chains: dict[str, set[str]]
    hooks: dict[str, list[str]]


def parse_save(text: str) -> Saved:
    """Parse ``iptables-save`` output (any tables)."""
    chains: dict[str, set[str]] = {}
    hooks: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name in OUR_CHAINS:
                chains.setdefault(table, set()).add(name)
        elif line.startswith("-A "):
            words = line.split()
            target = words[words.index("-j") + 1] if "-j" in words[:-1] else ""
            if words[1] not in OUR_CHAINS and target in OUR_CHAINS:
                hooks.setdefault(table, []).append(" ".join(words[1:]))
    return Saved(chains, hooks)


def restore_text(saved: Saved, rs: RuleSet | None) -> str:
    """The one ``iptables-restore --noflush`` transaction that turns ``saved`` into ``rs``
    (``None``: removes every vmagent chain and hook, i.e. ``clean``). Declaring a chain
    creates or flushes it; hooks already present are kept (so applying twice changes
    nothing), stale hooks and chains are deleted. Empty text: nothing to do."""
    out: list[str] = []
    for table in TABLES:
        want = rs.chains.get(table, []) if rs else []
        have = saved.chains.get(table, set())
        hooks_wanted = rs.hook_lines(table) if rs else []
        present = saved.hooks.get(table, [])
        lines = [f":{c} - [0:0]" for c in [*want, *sorted(have - set(want))]]
        lines += [f"-D {hook}" for hook in present if hook not in hooks_wanted]
        lines += [f"-X {c}" for c in sorted(have - set(want))]
        lines += [f"-A {c} {' '.join(w)}" for t, c, w in (rs.rules if rs else []) if t == table]
        lines += [f"-A {hook}" for hook in hooks_wanted if hook not in present]
        if lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""
