"""Outbound SMTP against real servers on loopback: aiosmtpd sinks, a closed port, a staller.

Each test runs its own event loop (`asyncio.run`) and closes its agent; sinks stop at the end
of their `with` block.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import pytest
import trustme

from maildetour.core.outcome import (
    Delivered,
    Outcome,
    PermanentFailure,
    TemporaryFailure,
    Unreachable,
)
from maildetour.config.model import DeliveryConfig
from maildetour.core.hostport import HostPort
from maildetour.delivery.base import Job
from maildetour.delivery.nexthop import (
    DnsTemporary,
    NextHopResolver,
    NextHops,
    NoHost,
    Resolution,
)
from maildetour.delivery.smtp_out import SmtpAgent
from maildetour.delivery.tls_policy import MtaSts, TlsPolicies
from tests.peers.dnsmasq import DnsRecords, running_dnsmasq
from tests.peers.ports import free_port
from tests.peers.sinks import running_sink

T = TypeVar("T")
MESSAGE = (b"From: a@example.com\r\nTo: b@dest.test\r\nSubject: test\r\n\r\n"
           b"line one\r\n.a line starting with a dot\r\n..two dots\r\nend\r\n")


@dataclass
class StaticHops:
    """A next-hop resolver that answers the same for every domain."""

    answer: Resolution

    async def resolve(self, domain: str) -> Resolution:
        return self.answer


def hops(*addresses: tuple[str, int]) -> StaticHops:
    return StaticHops(NextHops(tuple(HostPort(h, p, h) for h, p in addresses)))


def make_agent(nexthop: Any, ssl_context: ssl.SSLContext | None = None, sts: MtaSts | None = None,
               **settings: Any) -> SmtpAgent:
    """The agent with the config's defaults, short timeouts, and `settings` ([delivery] keys);
    `ssl_context` verifies certificates for tls = "verify" (default: the system's CAs)."""
    settings.setdefault("connect_timeout", 5.0)
    settings.setdefault("command_timeout", 5.0)
    settings.setdefault("data_timeout", 5.0)
    config = DeliveryConfig(**settings)
    policies = TlsPolicies(default=config.tls, per_domain=config.tls_policy, per_address={}, sts=sts)
    return SmtpAgent(local_hostname="mx.example.com", nexthop=nexthop, settings=config, policies=policies,
                     verify_context=ssl_context or ssl.create_default_context())


def with_agent(nexthop: Any, use: Callable[[SmtpAgent], Awaitable[T]], **kwargs: Any) -> T:
    async def main() -> T:
        agent = make_agent(nexthop, **kwargs)
        try:
            return await use(agent)
        finally:
            await agent.close()

    return asyncio.run(main())


def deliver_once(nexthop: Any, job: Job, **kwargs: Any) -> Mapping[str, Outcome]:
    return with_agent(nexthop, lambda agent: agent.deliver(job), **kwargs)


def job(*recipients: str, mail_from: str = "sender@example.com", data: bytes = MESSAGE,
        queue_id: str = "Q1") -> Job:
    return Job(queue_id, mail_from, recipients, data, 1.0e9)


def test_per_recipient_results_when_one_rcpt_is_refused() -> None:
    refuse_bob = lambda address: "550 5.1.1 no such user" if address.startswith("bob@") else None
    with running_sink(rcpt=refuse_bob) as sink:
        relay = NextHopResolver(None, relay={"dest.test": HostPort("127.0.0.1", sink.port)}, port=25)
        results = deliver_once(relay, job("alice@dest.test", "bob@dest.test", "carol@dest.test"))
        [received] = sink.wait_for(1)
    assert list(results) == ["alice@dest.test", "bob@dest.test", "carol@dest.test"]
    assert isinstance(results["alice@dest.test"], Delivered)
    assert isinstance(results["carol@dest.test"], Delivered)
    assert results["bob@dest.test"] == PermanentFailure("550 5.1.1 no such user", 550, "5.1.1",
                                                        "no such mailbox", alert=True,
                                                        relay=f"[127.0.0.1]:{sink.port}")
    assert received.rcpt_tos == ("alice@dest.test", "carol@dest.test")
    assert received.mail_from == "sender@example.com"
    assert received.data == MESSAGE  # dot-stuffing undone by the receiver: same bytes


def test_null_sender_is_sent_as_empty_path() -> None:
    with running_sink() as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test", mail_from=""))
        [received] = sink.wait_for(1)
    assert isinstance(results["a@dest.test"], Delivered)
    assert received.mail_from == ""


def test_4xx_after_data_is_temporary_for_every_accepted_recipient() -> None:
    with running_sink(temp_failures=1, temp_reply="451 4.3.0 Mail server temporarily rejected") as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test", "b@dest.test"))
        assert sink.messages == []
    assert results == {r: TemporaryFailure("451 4.3.0 Mail server temporarily rejected", 451, "4.3.0",
                                           "temporary server problem", relay=f"[127.0.0.1]:{sink.port}")
                       for r in ("a@dest.test", "b@dest.test")}


def test_5xx_after_data_is_permanent() -> None:
    dmarc = "550 5.7.26 Unauthenticated email is not accepted due to DMARC policy"
    with running_sink(refuse=lambda data: dmarc) as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)), job("hidden@dest.test"))
        assert sink.data_attempts == 1 and sink.messages == []
    assert results == {"hidden@dest.test": PermanentFailure(dmarc, 550, "5.7.26", "unauthenticated / fails DMARC",
                                                            relay=f"[127.0.0.1]:{sink.port}")}


def test_temporary_failure_then_success_on_the_reused_connection() -> None:
    async def twice(agent: SmtpAgent) -> list[Mapping[str, Outcome]]:
        return [await agent.deliver(job("a@dest.test", queue_id=q)) for q in ("Q1", "Q2")]

    with running_sink(temp_failures=1) as sink:
        first, second = with_agent(hops(("127.0.0.1", sink.port)), twice)
        sink.wait_for(1)
        assert sink.connections == 1
    assert isinstance(first["a@dest.test"], TemporaryFailure)
    assert isinstance(second["a@dest.test"], Delivered)


def test_closed_port_is_unreachable() -> None:
    port = free_port("127.0.0.1")  # nothing listens there once the probe socket is closed
    results = deliver_once(hops(("127.0.0.1", port)), job("a@dest.test", "b@dest.test"))
    assert set(results) == {"a@dest.test", "b@dest.test"}
    assert all(isinstance(o, Unreachable) for o in results.values()), results


def test_server_that_never_greets_is_temporary_after_connect_timeout() -> None:
    async def main() -> Mapping[str, Outcome]:
        accepted: list[asyncio.StreamWriter] = []

        async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # and say nothing: no 220 greeting

        server = await asyncio.start_server(stall, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        agent = make_agent(hops(("127.0.0.1", port)), connect_timeout=0.3)
        try:
            results = await agent.deliver(job("a@dest.test"))
        finally:
            await agent.close()
            server.close()
            for writer in accepted:
                writer.close()
            await server.wait_closed()
        assert len(accepted) == 1
        return results

    results = asyncio.run(main())
    assert isinstance(results["a@dest.test"], TemporaryFailure), results


def test_next_mx_is_tried_when_the_first_does_not_answer() -> None:
    closed = free_port("127.0.0.1")
    with running_sink() as sink:
        results = deliver_once(hops(("127.0.0.1", closed), ("127.0.0.1", sink.port)),
                               job("a@dest.test"))
        sink.wait_for(1)
    assert isinstance(results["a@dest.test"], Delivered)


def test_all_mx_failing_is_temporary_if_any_failure_is_temporary() -> None:
    closed = free_port("127.0.0.1")

    async def main() -> Mapping[str, Outcome]:
        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"421 4.4.5 busy.test Server busy, try again later\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        agent = make_agent(hops(("127.0.0.1", closed), ("127.0.0.1", port)))
        try:
            return await agent.deliver(job("a@dest.test"))
        finally:
            await agent.close()
            server.close()
            await server.wait_closed()

    results = asyncio.run(main())
    assert isinstance(results["a@dest.test"], TemporaryFailure), results
    assert "4.4.5" in results["a@dest.test"].reason


def test_no_host_and_dns_trouble_become_outcomes_without_connecting() -> None:
    null_mx = deliver_once(StaticHops(NoHost("dest.test: null MX")), job("a@dest.test"))
    no_domain = deliver_once(StaticHops(NoHost("MX dest.test: no such domain")), job("a@dest.test"))
    later = deliver_once(StaticHops(DnsTemporary("SERVFAIL")), job("a@dest.test"))
    assert [(o.reason, o.code, o.status) for o in null_mx.values()] == [
        ("556 5.1.10 dest.test: null MX", 556, "5.1.10")]
    assert [(o.reason, o.code, o.status) for o in no_domain.values()] == [
        ("550 5.1.2 MX dest.test: no such domain", 550, "5.1.2")]
    assert all(isinstance(o, PermanentFailure) for o in [*null_mx.values(), *no_domain.values()])
    assert [(type(o), o.reason, o.status) for o in later.values()] == [(TemporaryFailure, "SERVFAIL", "4.4.3")]


def test_address_that_cannot_go_on_the_wire_is_refused_locally() -> None:
    with running_sink() as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)),
                               job("ok@dest.test", "evil@dest.test> NOTIFY=NEVER"))
        sink.wait_for(1)
    assert isinstance(results["ok@dest.test"], Delivered)
    assert isinstance(results["evil@dest.test> NOTIFY=NEVER"], PermanentFailure)


def test_two_jobs_to_one_host_share_one_connection() -> None:
    async def burst(agent: SmtpAgent) -> list[Mapping[str, Outcome]]:
        return [await agent.deliver(job("a@dest.test", queue_id=f"Q{i}")) for i in range(3)]

    with running_sink() as sink:
        results = with_agent(hops(("127.0.0.1", sink.port)), burst)
        assert len(sink.wait_for(3)) == 3
        assert sink.connections == 1
    assert all(isinstance(r["a@dest.test"], Delivered) for r in results)


def test_idle_connection_is_dropped_after_idle_timeout() -> None:
    async def apart(agent: SmtpAgent) -> None:
        await agent.deliver(job("a@dest.test"))
        await asyncio.sleep(0.5)  # longer than idle_timeout
        await agent.deliver(job("a@dest.test"))

    with running_sink() as sink:
        with_agent(hops(("127.0.0.1", sink.port)), apart, connection_idle_timeout=0.1)
        sink.wait_for(2)
        assert sink.connections == 2


def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def apart(agent: SmtpAgent) -> list[Mapping[str, Outcome]]:
        first = await agent.deliver(job("a@dest.test"))
        await asyncio.sleep(0.6)  # the sink's own idle timeout closes the session meanwhile
        return [first, await agent.deliver(job("a@dest.test"))]

    with running_sink(smtp_options={"timeout": 0.2}) as sink:
        results = with_agent(hops(("127.0.0.1", sink.port)), apart, connection_idle_timeout=30.0)
        sink.wait_for(2)
        assert sink.connections == 2
    assert all(isinstance(r["a@dest.test"], Delivered) for r in results)


def test_connections_per_host_are_bounded() -> None:
    async def parallel(agent: SmtpAgent) -> list[Mapping[str, Outcome]]:
        return list(await asyncio.gather(
            *(agent.deliver(job("a@dest.test", queue_id=f"Q{i}")) for i in range(6))))

    with running_sink(delay=0.1) as sink:
        results = with_agent(hops(("127.0.0.1", sink.port)), parallel,
                             max_connections_per_host=2)
        sink.wait_for(6)
        assert sink.connections == 2
    assert all(isinstance(r["a@dest.test"], Delivered) for r in results)


@pytest.fixture(scope="module")
def tls_pair() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context with a cert for 127.0.0.1, client context trusting its CA)."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "sink.test").configure_cert(server)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client)
    return server, client


def test_starttls_is_used_when_offered(tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, _ = tls_pair
    with running_sink(tls_context=server_ctx) as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test"))
        [received] = sink.wait_for(1)
    assert isinstance(results["a@dest.test"], Delivered)
    assert received.tls is True


def test_verified_tls(tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls_pair
    with running_sink(tls_context=server_ctx) as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test"),
                               tls="verify", ssl_context=client_ctx)
        [received] = sink.wait_for(1)
    assert isinstance(results["a@dest.test"], Delivered)
    assert received.tls is True


def test_opportunistic_tls_failure_falls_back_to_plain_text() -> None:
    # A server whose TLS handshake cannot work for us (it demands a client certificate).
    ca = trustme.CA()
    picky = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(picky)
    ca.configure_trust(picky)
    picky.verify_mode = ssl.CERT_REQUIRED
    with running_sink(tls_context=picky) as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test"))
        [received] = sink.wait_for(1)
    assert isinstance(results["a@dest.test"], Delivered)
    assert received.tls is False


def test_verify_and_required_never_downgrade(tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, _ = tls_pair
    strict = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # does not trust the test CA
    strict.load_verify_locations(cadata=trustme.CA().cert_pem.bytes().decode())
    with running_sink(tls_context=server_ctx) as sink:
        verified = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test"),
                                tls="verify", ssl_context=strict)
        assert sink.messages == []
        encrypted = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test"),
                                 tls="required", ssl_context=strict)
        [received] = sink.wait_for(1)
    assert isinstance(verified["a@dest.test"], TemporaryFailure)  # never a downgrade to plain text
    assert "TLS" in verified["a@dest.test"].reason
    # "required" encrypts without checking the certificate: delivered, over TLS.
    assert isinstance(encrypted["a@dest.test"], Delivered) and received.tls is True


def test_required_tls_when_not_offered_is_temporary() -> None:
    with running_sink() as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test"), tls="required")
        assert sink.messages == []
    assert isinstance(results["a@dest.test"], TemporaryFailure)


def test_smtputf8_and_8bitmime_are_used_when_needed() -> None:
    data = "From: jörg@example.com\r\nSubject: grüße\r\n\r\nnaïve body\r\n".encode()
    with running_sink() as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)),
                               job("ünicode@dest.test", mail_from="jörg@example.com", data=data))
        [received] = sink.wait_for(1)
        plain = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test"))
        ascii_received = sink.wait_for(2)[1]
    assert isinstance(results["ünicode@dest.test"], Delivered)
    assert received.rcpt_tos == ("ünicode@dest.test",)
    assert received.mail_from == "jörg@example.com"
    assert received.data == data
    assert "SMTPUTF8" in received.mail_options and "BODY=8BITMIME" in received.mail_options
    assert isinstance(plain["a@dest.test"], Delivered)
    assert not {"SMTPUTF8", "BODY=8BITMIME"} & set(ascii_received.mail_options)


def test_non_ascii_address_without_smtputf8_is_permanent() -> None:
    with running_sink(smtp_options={"enable_SMTPUTF8": False}) as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)), job("ünicode@dest.test"))
        assert sink.attempts == 0
    outcome = results["ünicode@dest.test"]
    assert isinstance(outcome, PermanentFailure) and "5.6.7" in outcome.reason


def test_message_over_the_advertised_size_is_refused_before_data() -> None:
    with running_sink(smtp_options={"data_size_limit": 100}) as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)),
                               job("a@dest.test", data=MESSAGE + b"x" * 200 + b"\r\n"))
        assert sink.data_attempts == 0
    outcome = results["a@dest.test"]
    assert isinstance(outcome, PermanentFailure) and "5.3.4" in outcome.reason


@pytest.mark.peer("dnsmasq")
def test_delivery_by_mx_lookup_through_a_real_dns_server(tmp_path: Path) -> None:
    closed = free_port("127.0.0.2")
    with running_sink("127.0.0.3", closed) as sink:  # the backup MX; the primary is down
        records = DnsRecords(
            zones=("dest.test",),
            mx=(("dest.test", "mx1.dest.test", 10), ("dest.test", "mx2.dest.test", 20)),
            a=(("mx1.dest.test", "127.0.0.2"), ("mx2.dest.test", "127.0.0.3")),
        )
        with running_dnsmasq(tmp_path, records) as dns_peer:
            resolver = NextHopResolver(dns_peer.resolver(), port=closed)
            results = deliver_once(resolver, job("a@dest.test"))
        [received] = sink.wait_for(1)
    assert isinstance(results["a@dest.test"], Delivered), results
    assert received.rcpt_tos == ("a@dest.test",)
