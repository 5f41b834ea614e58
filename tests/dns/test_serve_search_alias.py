"""The search-domain alias (Istio's autopath-like CNAME for ``<name>.<search[0]>``).

- No alias for a name that already ends in search[0] (reference 3.4 step 5): it is forwarded
  and the upstream's NXDOMAIN reaches the client.
- Wildcards behind search[0] (istio/istio#61732, open in Istio): ``foo.wild.example.com.`` +
  search[0] answers ``CNAME foo.wild.example.com.`` then its address, never a ``*`` label.

One server for the module: ``dnsfixtures.TABLE``, ``--namespace ns1``,
``--search ns1.svc.cluster.local svc.cluster.local cluster.local``, the standard upstream
(authoritative for cluster.local and example.com, so unknown names there are NXDOMAIN).
"""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from dnsfixtures import Dnsmasq, DnsServer, ServerFactory, answer_records, tcp, udp

pytestmark = pytest.mark.timeout(60)

IN = int(dns.rdataclass.IN)
SEARCH0 = "ns1.svc.cluster.local."


@pytest.fixture(scope="module")
def srv(serve_module: ServerFactory) -> DnsServer:
    return serve_module.start()


@pytest.mark.parametrize(
    "name",
    [
        "productpage.ns1.svc.cluster.local." + SEARCH0,  # Kubernetes key in search[0]
        "v6only.ns1.svc.cluster.local." + SEARCH0,
    ],
)
def test_name_already_in_first_search_domain_is_forwarded(
    srv: DnsServer, upstream: Dnsmasq, name: str
) -> None:
    before = upstream.count(name)
    msg = udp(srv, name, "A")
    assert msg.rcode() == dns.rcode.NXDOMAIN, "answered from the table instead of upstream"
    assert msg.answer == []
    assert [rrset.rdtype for rrset in msg.authority] == [dns.rdatatype.SOA]
    assert upstream.count(name) == before + 1
    # Over TCP too (from the cache now: an NXDOMAIN with an SOA is cached, RFC 2308).
    assert tcp(srv, name, "A").rcode() == dns.rcode.NXDOMAIN


def test_names_outside_first_search_domain_keep_their_alias(srv: DnsServer) -> None:
    msg = udp(srv, "reviews.ns2.svc.cluster.local." + SEARCH0, "A")
    records = answer_records(msg)
    assert records[0] == (
        "reviews.ns2.svc.cluster.local." + SEARCH0,
        "CNAME",
        IN,
        "reviews.ns2.svc.cluster.local.",
        30,
    )


@pytest.mark.parametrize(
    ("name", "ip"),
    [
        ("foo.wild.example.com.", "1.2.3.4"),
        ("x.y.wild.example.com.", "1.2.3.4"),
        ("a.b.wild.example.com.", "5.6.7.8"),  # *.b.wild wins over *.wild
        ("FoO.WiLd.example.com.", "1.2.3.4"),  # 0x20: the target keeps the asked spelling
    ],
)
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_wildcard_behind_search_domain_answers_the_matched_name(
    srv: DnsServer, name: str, ip: str, transport: str
) -> None:
    ask = udp if transport == "udp" else tcp
    msg = ask(srv, name + SEARCH0, "A")
    assert msg.rcode() == dns.rcode.NOERROR
    target = name.lower()
    assert [(o, t, d) for o, t, _, d, _ in answer_records(msg)] == [
        ((name + SEARCH0).lower(), "CNAME", target),
        (target, "A", ip),
    ]


@pytest.mark.parametrize("rdtype", ["A", "AAAA"])
def test_no_star_label_in_any_answer(srv: DnsServer, rdtype: str) -> None:
    for name in (
        "foo.wild.example.com.",
        "foo.wild.example.com." + SEARCH0,
        "q.b.wild.example.com.",
    ):
        for ask in (udp, tcp):
            msg: dns.message.Message = ask(srv, name, rdtype)
            assert msg.rcode() == dns.rcode.NOERROR
            text = "\n".join(rrset.to_text() for rrset in msg.answer + msg.authority)
            assert "*" not in text, text
