"""The real peer programs start on loopback, behave as the other tests rely on, and stop."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import dns.resolver
import pytest

from tests.peers.dnsmasq import DnsPeer, DnsRecords, running_dnsmasq
from tests.peers.postfix import PostfixPeer, running_postfix

# Built from pieces so that no file in the repository is itself the EICAR test file.
EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-" + "TEST-FILE!$H+H*"
CLIENT = ("127.0.0.1", 0)


def _message(subject: str, body: str) -> bytes:
    return (
        f"From: sender@example.com\r\nTo: someone@gmail.com\r\nSubject: {subject}\r\n\r\n{body}\r\n"
    ).encode()


def _smtp(peer: PostfixPeer) -> smtplib.SMTP:
    return smtplib.SMTP(peer.host, peer.port, local_hostname="client.test", source_address=CLIENT, timeout=10)


@pytest.fixture(scope="module")
def gmail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixPeer]:
    with running_postfix(
        tmp_path_factory.mktemp("postfix"),
        users=("known@gmail.com", "other@gmail.com"),
        header_reject=(("^Subject: .*forbidden", "5.7.1 header refused"),),
    ) as peer:
        yield peer


def test_postfix_greets_without_its_version(gmail: PostfixPeer) -> None:
    with _smtp(gmail) as smtp:
        code, _ = smtp.noop()
        assert code == 250
    with smtplib.SMTP(local_hostname="client.test", source_address=CLIENT, timeout=10) as smtp:
        code, banner = smtp.connect(gmail.host, gmail.port)
    assert (code, banner) == (220, b"mx.peer.test ESMTP")


def test_postfix_delivers_accepted_mail_into_the_recipients_maildir(gmail: PostfixPeer) -> None:
    with _smtp(gmail) as smtp:
        refused = smtp.sendmail("sender@example.com", ["known@gmail.com"], _message("hello", "first copy"))
    assert refused == {}
    [delivered] = gmail.wait_messages("known@gmail.com", 1)
    assert b"Delivered-To: known@gmail.com" in delivered
    assert b"first copy" in delivered
    assert gmail.messages("other@gmail.com") == []


def test_postfix_refuses_the_eicar_body_after_data_with_550_5_7_0(gmail: PostfixPeer) -> None:
    with _smtp(gmail) as smtp, pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail("sender@example.com", ["other@gmail.com"], _message("scan me", EICAR))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"5.7.0 message refused: virus found"
    deadline = time.monotonic() + 10  # postfix logs through its own daemon: wait for the line
    while "reject: body" not in gmail.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reject: body" in gmail.log()
    assert gmail.messages("other@gmail.com") == []


def test_postfix_refuses_a_header_match_after_data(gmail: PostfixPeer) -> None:
    with _smtp(gmail) as smtp, pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail("sender@example.com", ["other@gmail.com"], _message("this is forbidden", "x"))
    assert (refused.value.smtp_code, refused.value.smtp_error) == (550, b"5.7.1 header refused")


def test_postfix_refuses_an_unknown_user_at_rcpt_with_550_5_1_1(gmail: PostfixPeer) -> None:
    with _smtp(gmail) as smtp:
        smtp.ehlo()
        smtp.mail("sender@example.com")
        code, text = smtp.rcpt("nobody-here@gmail.com")
    assert code == 550
    assert text.startswith(b"5.1.1 <nobody-here@gmail.com>: Recipient address rejected")


def test_postfix_is_not_an_open_relay(gmail: PostfixPeer) -> None:
    with _smtp(gmail) as smtp:
        smtp.ehlo()
        smtp.mail("sender@example.com")
        code, text = smtp.rcpt("someone@example.org")
    assert code == 554
    assert text.startswith(b"5.7.1 ")


def test_two_postfix_instances_run_at_once_and_keep_their_mail_apart(tmp_path: Path) -> None:
    with running_postfix(tmp_path / "one") as one, running_postfix(tmp_path / "two") as two:
        assert one.port != two.port
        for peer, body in ((one, "to the first"), (two, "to the second")):
            with _smtp(peer) as smtp:
                smtp.sendmail("sender@example.com", ["anyone@gmail.com"], _message("hi", body))
        [first] = one.wait_messages("anyone@gmail.com", 1)
        [second] = two.wait_messages("Anyone@Gmail.com", 1)
    assert b"to the first" in first and b"to the second" not in first
    assert b"to the second" in second
    # Stopped: nothing listens any more.
    with pytest.raises(OSError):
        smtplib.SMTP(one.host, one.port, local_hostname="client.test", source_address=CLIENT, timeout=2)


DKIM_KEY = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 9  # 414 bytes


@pytest.fixture(scope="module")
def dns_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsPeer]:
    records = DnsRecords(
        zones=("example.com", "null.test"),
        mx=(("example.com", "mx.example.com", 10), ("null.test", ".", 0)),
        a=(("mx.example.com", "127.0.0.2"),),
        txt=(("sel._domainkey.example.com", DKIM_KEY), ("example.com", 'v=spf1 -all "quoted"')),
    )
    with running_dnsmasq(tmp_path_factory.mktemp("dnsmasq"), records) as peer:
        yield peer


def test_dnsmasq_answers_mx_and_a(dns_peer: DnsPeer) -> None:
    resolver = dns_peer.sync_resolver()
    [mx] = resolver.resolve("example.com", "MX")
    assert (mx.preference, mx.exchange.to_text()) == (10, "mx.example.com.")
    assert [a.address for a in resolver.resolve("mx.example.com", "A")] == ["127.0.0.2"]


def test_dnsmasq_serves_a_null_mx(dns_peer: DnsPeer) -> None:
    [mx] = dns_peer.sync_resolver().resolve("null.test", "MX")
    assert (mx.preference, mx.exchange.to_text()) == (0, ".")


def test_dnsmasq_splits_a_long_txt_into_strings_that_join_back(dns_peer: DnsPeer) -> None:
    [txt] = dns_peer.sync_resolver().resolve("sel._domainkey.example.com", "TXT")
    assert all(len(s) <= 255 for s in txt.strings) and len(txt.strings) == 2
    assert b"".join(txt.strings).decode() == DKIM_KEY
    [spf] = dns_peer.sync_resolver().resolve("example.com", "TXT")
    assert b"".join(spf.strings) == b'v=spf1 -all "quoted"'


def test_dnsmasq_answers_nxdomain_inside_its_zone_and_never_forwards(dns_peer: DnsPeer) -> None:
    resolver = dns_peer.sync_resolver()
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("nope.example.com", "A")
    with pytest.raises(dns.resolver.NoAnswer):  # the name exists (MX), but has no A record
        resolver.resolve("example.com", "A")
    with pytest.raises(dns.resolver.NoNameservers):  # outside every zone: REFUSED, not forwarded
        resolver.resolve("gmail.com", "MX")
    assert "forwarded" not in dns_peer.log()


def test_dnsmasq_async_resolver_sees_the_same_records(dns_peer: DnsPeer) -> None:
    async def lookup() -> list[str]:
        answer = await dns_peer.resolver().resolve("example.com", "MX")
        return [rr.exchange.to_text() for rr in answer]

    assert asyncio.run(lookup()) == ["mx.example.com."]
