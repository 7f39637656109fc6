"""Next hop per recipient domain: relay overrides, MX order, implicit MX, null MX, DNS trouble.

Against a fake resolver (zone data in a dict, real dnspython rdata); one test at the end uses a
real dnsmasq on loopback (`tests.peers.dnsmasq`).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.resolver
import dns.rrset
import pytest

from maildetour.core.hostport import HostPort
from maildetour.delivery.nexthop import (
    MAX_EXCHANGES,
    DnsTemporary,
    NextHopResolver,
    NextHops,
    NoHost,
    Resolution,
)
from tests.peers.dnsmasq import DnsRecords, running_dnsmasq


@dataclass(frozen=True)
class _Answer:
    rrset: dns.rrset.RRset | None


@dataclass
class FakeResolver:
    """Answers from `records[(name, rdtype)]`: a list of rdata texts or an exception.
    Names not listed at all are NXDOMAIN; listed names without that type answer empty."""

    records: dict[tuple[str, str], list[str] | Exception]
    queries: list[tuple[str, str]] = field(default_factory=list)

    async def resolve(self, qname: str, rdtype: str, *, raise_on_no_answer: bool = True) -> _Answer:
        assert raise_on_no_answer is False
        name = str(qname).lower().rstrip(".")
        self.queries.append((name, rdtype))
        found = self.records.get((name, rdtype))
        if isinstance(found, Exception):
            raise found
        if found is None:
            if not any(n == name for n, _ in self.records):
                raise dns.resolver.NXDOMAIN(qnames=[dns.name.from_text(name)])
            return _Answer(None)
        return _Answer(dns.rrset.from_text_list(name + ".", 300, "IN", rdtype, found))


def resolve(fake: FakeResolver | None, domain: str, **kwargs: object) -> Resolution:
    kwargs.setdefault("port", 25)
    resolver = NextHopResolver(fake, **kwargs)  # type: ignore[arg-type]
    return asyncio.run(resolver.resolve(domain))


def ips(result: Resolution) -> list[str]:
    assert isinstance(result, NextHops), result
    return [h.host for h in result.hosts]


def test_relay_with_ip_literal_wins_over_mx_and_asks_no_dns() -> None:
    fake = FakeResolver({("gmail.com", "MX"): ["5 gmail-smtp-in.l.google.com."]})
    result = resolve(fake, "Gmail.COM.", relay={"gmail.com": HostPort("127.0.0.2", 2525)})
    assert result == NextHops((HostPort("127.0.0.2", 2525, "127.0.0.2"),), relay=True)
    assert fake.queries == []


def test_relay_ipv6_literal_in_brackets() -> None:
    result = resolve(None, "example.net", relay={"example.net": HostPort("[::1]", 2526)})
    assert result == NextHops((HostPort("::1", 2526, "::1"),), relay=True)


def test_relay_host_name_is_resolved_by_address_only() -> None:
    fake = FakeResolver({("smart.test", "A"): ["127.0.0.5"], ("smart.test", "AAAA"): ["::1"],
                         ("smart.test", "MX"): ["10 elsewhere.test."]})
    result = resolve(fake, "example.net", relay={"example.net": HostPort("smart.test", 587)})
    assert result == NextHops((HostPort("127.0.0.5", 587, "smart.test"),
                               HostPort("::1", 587, "smart.test")), relay=True)
    assert ("smart.test", "MX") not in fake.queries


def test_mx_hosts_in_preference_order_a_before_aaaa() -> None:
    fake = FakeResolver({
        ("example.org", "MX"): ["20 backup.example.org.", "10 primary.example.org."],
        ("primary.example.org", "A"): ["127.0.0.10", "127.0.0.11"],
        ("primary.example.org", "AAAA"): ["::10"],
        ("backup.example.org", "A"): ["127.0.0.20"],
    })
    result = resolve(fake, "example.org", port=2500)
    assert ips(result) == ["127.0.0.10", "127.0.0.11", "::10", "127.0.0.20"]
    assert isinstance(result, NextHops)
    assert {h.port for h in result.hosts} == {2500}
    assert result.hosts[0].name == "primary.example.org"


def test_equal_preference_is_shuffled_but_never_before_better_preference() -> None:
    fake = FakeResolver({
        ("example.org", "MX"): ["10 a.example.org.", "10 b.example.org.", "5 first.example.org."],
        ("a.example.org", "A"): ["127.0.0.1"], ("b.example.org", "A"): ["127.0.0.2"],
        ("first.example.org", "A"): ["127.0.0.9"],
    })
    orders = {tuple(ips(resolve(fake, "example.org", rng=random.Random(seed))))
              for seed in range(20)}
    assert orders == {("127.0.0.9", "127.0.0.1", "127.0.0.2"),
                      ("127.0.0.9", "127.0.0.2", "127.0.0.1")}


def test_no_mx_means_implicit_mx_on_the_domain_itself() -> None:
    fake = FakeResolver({("example.org", "A"): ["127.0.0.7"], ("example.org", "AAAA"): ["::7"]})
    result = resolve(fake, "example.org")
    assert result == NextHops((HostPort("127.0.0.7", 25, "example.org"),
                               HostPort("::7", 25, "example.org")))


def test_no_mx_and_no_address_is_no_host() -> None:
    fake = FakeResolver({("example.org", "TXT"): ['"v=spf1 -all"']})
    assert isinstance(resolve(fake, "example.org"), NoHost)


def test_null_mx_is_no_host_without_looking_up_addresses() -> None:
    fake = FakeResolver({("example.org", "MX"): ["0 ."], ("example.org", "A"): ["127.0.0.7"]})
    result = resolve(fake, "example.org")
    assert isinstance(result, NoHost) and "null MX" in result.reason
    assert fake.queries == [("example.org", "MX")]


def test_nxdomain_is_no_host() -> None:
    result = resolve(FakeResolver({}), "nowhere.example")
    assert isinstance(result, NoHost)


@pytest.mark.parametrize("error", [dns.resolver.LifetimeTimeout(timeout=1.0, errors={}),
                                   dns.exception.Timeout(),
                                   dns.resolver.NoNameservers(),
                                   OSError("network down")])
def test_dns_timeout_and_servfail_are_temporary(error: Exception) -> None:
    fake = FakeResolver({("example.org", "MX"): error})
    assert isinstance(resolve(fake, "example.org"), DnsTemporary)


def test_mx_host_without_address_is_skipped() -> None:
    fake = FakeResolver({
        ("example.org", "MX"): ["10 gone.example.org.", "20 ok.example.org."],
        ("ok.example.org", "A"): ["127.0.0.20"],
    })
    assert ips(resolve(fake, "example.org")) == ["127.0.0.20"]


def test_mx_hosts_that_all_do_not_exist_is_no_host() -> None:
    fake = FakeResolver({("example.org", "MX"): ["10 gone.example.org.", "20 gone2.example.org."]})
    assert isinstance(resolve(fake, "example.org"), NoHost)


def test_mx_host_lookup_timeout_with_no_other_address_is_temporary() -> None:
    fake = FakeResolver({
        ("example.org", "MX"): ["10 slow.example.org."],
        ("slow.example.org", "A"): dns.exception.Timeout(),
        ("slow.example.org", "AAAA"): dns.exception.Timeout(),
    })
    assert isinstance(resolve(fake, "example.org"), DnsTemporary)


def test_only_the_best_exchanges_are_used() -> None:
    records: dict[tuple[str, str], list[str] | Exception] = {
        ("example.org", "MX"): [f"{i} mx{i}.example.org." for i in range(20)]}
    for i in range(20):
        records[(f"mx{i}.example.org", "A")] = [f"127.0.1.{i}"]
    fake = FakeResolver(records)
    assert ips(resolve(fake, "example.org")) == [f"127.0.1.{i}" for i in range(MAX_EXCHANGES)]


def test_without_resolver_only_relays_work() -> None:
    assert isinstance(resolve(None, "example.org"), DnsTemporary)
    assert isinstance(resolve(None, "example.org", relay={"example.org": HostPort("mx.test", 25)}),
                      DnsTemporary)


@pytest.mark.peer("dnsmasq")
def test_mx_lookup_against_real_dnsmasq(tmp_path: Path) -> None:
    records = DnsRecords(
        zones=("example.test",),
        mx=(("example.test", "mx1.example.test", 10), ("example.test", "mx2.example.test", 20),
            ("null.example.test", ".", 0)),
        a=(("mx1.example.test", "127.0.0.31"), ("mx2.example.test", "127.0.0.32"),
           ("plain.example.test", "127.0.0.33")),
    )
    with running_dnsmasq(tmp_path, records) as peer:
        resolver = NextHopResolver(peer.resolver(), port=2525)

        async def lookups() -> list[Resolution]:
            return [await resolver.resolve(d) for d in
                    ("example.test", "plain.example.test", "missing.example.test",
                     "null.example.test")]

        mx, implicit, missing, null = asyncio.run(lookups())
    assert ips(mx) == ["127.0.0.31", "127.0.0.32"]
    assert ips(implicit) == ["127.0.0.33"]
    assert isinstance(missing, NoHost)
    assert isinstance(null, NoHost)
