"""MTA-STS end to end (issue 10, transport security): a domain that publishes an enforce policy
gets its copies over verified TLS to the MX hosts it names, or not at all (a temporary failure,
then the detour), never in plain text.

Real peers over loopback: dnsmasq serves dest.test's MX, the `_mta-sts` TXT record and the
policy host's address; a small HTTPS server (test CA) serves the policy file; aiosmtpd sinks
play the MX, with or without STARTTLS.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

import pytest
import trustme

from maildetour.config.model import DeliveryConfig
from maildetour.core.outcome import Delivered, Outcome, TemporaryFailure
from maildetour.delivery.base import Job
from maildetour.delivery.nexthop import NextHopResolver
from maildetour.delivery.smtp_out import SmtpAgent
from maildetour.delivery.tls_policy import MtaSts, TlsPolicies
from tests.peers.dnsmasq import DnsPeer, DnsRecords, running_dnsmasq
from tests.peers.https import HttpsPeer, running_https
from tests.peers.ports import free_port
from tests.peers.sinks import running_sink

ENFORCE = b"version: STSv1\r\nmode: enforce\r\nmx: mx.dest.test\r\nmax_age: 86400\r\n"
MESSAGE = b"From: a@example.com\r\nTo: h@dest.test\r\nSubject: sts\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def records(policy_id: str = "1") -> DnsRecords:
    return DnsRecords(zones=("dest.test",), mx=(("dest.test", "mx.dest.test", 10),),
                      a=(("mx.dest.test", "127.0.0.1"), ("mta-sts.dest.test", "127.0.0.1")),
                      txt=(("_mta-sts.dest.test", f"v=STSv1; id={policy_id};"),))


def deliver(dns_peer: DnsPeer, https: HttpsPeer | None, ca: trustme.CA, smtp_port: int,
            **settings: Any) -> Mapping[str, Outcome]:
    async def main() -> Mapping[str, Outcome]:
        verify = ssl.create_default_context()
        ca.configure_trust(verify)
        sts = MtaSts(dns_peer.resolver(), context=verify, port=https.port if https else free_port(), timeout=3.0,
                     clock=time.time)
        config = DeliveryConfig(connect_timeout=3.0, command_timeout=3.0, data_timeout=3.0, **settings)
        agent = SmtpAgent(local_hostname="mx.example.com",
                          nexthop=NextHopResolver(dns_peer.resolver(), port=smtp_port), settings=config,
                          policies=TlsPolicies(default=config.tls, per_domain={}, per_address={}, sts=sts),
                          verify_context=verify)
        try:
            return await agent.deliver(Job("Q1", "SRS0=x@example.com", ("h@dest.test",), MESSAGE, 1.0e9))
        finally:
            await agent.close()

    return asyncio.run(main())


@pytest.fixture
def dns_peer(tmp_path: Path) -> Iterator[DnsPeer]:
    with running_dnsmasq(tmp_path / "dns", records()) as peer:
        yield peer


def tls_sink(ca: trustme.CA, name: str = "mx.dest.test") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


def test_an_enforce_policy_gets_verified_tls_to_the_named_mx(dns_peer: DnsPeer, ca: trustme.CA) -> None:
    policy = {"/.well-known/mta-sts.txt": ("text/plain", ENFORCE)}
    with running_https(policy, ca.issue_cert("mta-sts.dest.test")) as https, \
            running_sink(tls_context=tls_sink(ca)) as mx:
        results = deliver(dns_peer, https, ca, mx.port)
        [received] = mx.wait_for(1)
    assert isinstance(results["h@dest.test"], Delivered)
    assert received.tls is True and https.requests == ["/.well-known/mta-sts.txt"]


def test_an_enforce_policy_never_lets_a_copy_go_in_plain_text(dns_peer: DnsPeer, ca: trustme.CA) -> None:
    policy = {"/.well-known/mta-sts.txt": ("text/plain", ENFORCE)}
    with running_https(policy, ca.issue_cert("mta-sts.dest.test")) as https, running_sink() as mx:
        results = deliver(dns_peer, https, ca, mx.port)  # the MX offers no STARTTLS
        assert mx.messages == []
    outcome = results["h@dest.test"]
    assert isinstance(outcome, TemporaryFailure) and "TLS" in outcome.reason


def test_an_mx_the_policy_does_not_name_is_not_used(dns_peer: DnsPeer, ca: trustme.CA) -> None:
    other = ENFORCE.replace(b"mx: mx.dest.test", b"mx: other.dest.test")
    with running_https({"/.well-known/mta-sts.txt": ("text/plain", other)}, ca.issue_cert("mta-sts.dest.test")) as https, \
            running_sink(tls_context=tls_sink(ca)) as mx:
        results = deliver(dns_peer, https, ca, mx.port)
        assert mx.messages == [] and mx.connections == 0
    outcome = results["h@dest.test"]
    assert isinstance(outcome, TemporaryFailure) and "matches its MTA-STS policy" in outcome.reason


def test_testing_mode_and_an_unreachable_policy_change_nothing(dns_peer: DnsPeer, ca: trustme.CA) -> None:
    testing = ENFORCE.replace(b"mode: enforce", b"mode: testing")
    with running_https({"/.well-known/mta-sts.txt": ("text/plain", testing)}, ca.issue_cert("mta-sts.dest.test")) as https, \
            running_sink() as mx:
        in_testing = deliver(dns_peer, https, ca, mx.port)
        unreachable = deliver(dns_peer, None, ca, mx.port)  # nothing listens for the policy
        mx.wait_for(2)
    assert isinstance(in_testing["h@dest.test"], Delivered)
    assert isinstance(unreachable["h@dest.test"], Delivered)


def test_a_policy_served_with_a_wrong_certificate_or_type_is_no_policy(dns_peer: DnsPeer, ca: trustme.CA) -> None:
    for files, cert in (({"/.well-known/mta-sts.txt": ("text/plain", ENFORCE)}, trustme.CA().issue_cert("mta-sts.dest.test")),
                        ({"/.well-known/mta-sts.txt": ("text/html", ENFORCE)}, ca.issue_cert("mta-sts.dest.test"))):
        with running_https(files, cert) as https, running_sink() as mx:
            results = deliver(dns_peer, https, ca, mx.port)
            mx.wait_for(1)
        assert isinstance(results["h@dest.test"], Delivered)  # as without MTA-STS: opportunistic
