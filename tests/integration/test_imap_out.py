"""The IMAP APPEND agent (maildetour.delivery.imap_out) against a real Dovecot on loopback.

Each test starts its own Dovecot (`tests.peers.dovecot`: implicit TLS and STARTTLS listeners,
a certificate from a test CA, Maildir as `nobody`), runs the agent in its own event loop and
closes it, then reads back what Dovecot stored with the stdlib IMAP client. Evidence of
connections comes from Dovecot's own log (one "Login:" line per login). XOAUTH2 is tested
against Dovecot's oauth2 passdb, which asks a loopback introspection server about the token.
A few tests need a peer that misbehaves on purpose (never greets, no STARTTLS): a few lines of
asyncio server in the test itself. The last tests check the reply table and folder-name
encoding as plain values, for the replies Dovecot cannot be made to give.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ssl
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Mapping, TypeVar

import pytest
import trustme
from aioimaplib.aioimaplib import Response

from maildetour.config.model import IMAP_KEEPALIVE, ImapAccount
from maildetour.core.outcome import (
    Delivered,
    Outcome,
    PermanentFailure,
    TemporaryFailure,
)
from maildetour.delivery.base import Job
from maildetour.delivery.imap_out import (
    ImapAgent,
    mailbox_name,
    outcome_for_append,
    probe,
)
from tests.peers.dovecot import DovecotPeer, running_dovecot
from tests.peers.ports import free_port

T = TypeVar("T")

# What the scheduler hands over: the stored message with our Received line on top. CRLF line
# ends, a line starting with a dot, 8-bit UTF-8 text, no trailing blank line trimming.
MESSAGE = ("Received: from mail.example.org (mail.example.org [192.0.2.1])\r\n"
           "\tby mx.example.com with ESMTPS id 4bQ1; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
           "From: Sender <sender@example.org>\r\nTo: ituki@example.com\r\n"
           "Subject: detoured\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           "Grüße aus der Umleitung.\r\n.a line starting with a dot\r\n\r\nend\r\n").encode()
RECEIVED_AT = 1700000000.75  # 2023-11-14 22:13:20 UTC
TIMEOUT = 5.0


@pytest.fixture
def dovecot() -> Iterator[DovecotPeer]:
    with running_dovecot() as peer:
        yield peer


def account(peer: DovecotPeer, **changes: Any) -> ImapAccount:
    """An implicit-TLS account on `peer` with its password in a file, and `changes`."""
    password_file = peer.base / "password"
    password_file.write_text(peer.password + "\n")
    fields: dict[str, Any] = dict(
        name="hidden", host=peer.host, port=peer.imaps_port, tls="implicit", user=peer.user,
        timeout=TIMEOUT, connections=1, password_file=password_file, ca_file=peer.ca_file)
    fields.update(changes)
    return ImapAccount(**fields)


def job(*recipients: str, data: bytes = MESSAGE, received_at: float = RECEIVED_AT) -> Job:
    return Job("Q1", "sender@example.org", recipients or ("imap:hidden",), data, received_at)


def with_agent(accounts: Mapping[str, ImapAccount], use: Callable[[ImapAgent], Awaitable[T]],
               **options: Any) -> T:
    options.setdefault("keepalive", IMAP_KEEPALIVE)

    async def main() -> T:
        agent = ImapAgent(accounts, **options)
        try:
            return await use(agent)
        finally:
            await agent.close()

    return asyncio.run(main())


def deliver_once(imap: ImapAccount, data: bytes = MESSAGE) -> Outcome:
    results = with_agent({"hidden": imap}, lambda agent: agent.deliver(job(data=data)))
    assert list(results) == ["imap:hidden"]
    return results["imap:hidden"]


def test_append_stores_the_exact_bytes_with_received_at_as_internal_date(dovecot: DovecotPeer) -> None:
    outcome = deliver_once(account(dovecot))
    assert isinstance(outcome, Delivered)
    assert (outcome.code, outcome.status) == (250, "2.0.0")
    assert "APPENDUID" in outcome.reason and dovecot.host in outcome.reason
    [stored] = dovecot.messages()
    assert stored.data == MESSAGE
    assert stored.internaldate == "14-Nov-2023 22:13:20 +0000"
    assert "\\Seen" not in stored.flags and "\\Flagged" not in stored.flags


def test_password_from_a_password_command(dovecot: DovecotPeer) -> None:
    secret = dovecot.base / "secret"
    secret.write_text(dovecot.password + "\nnot part of it\n")
    outcome = deliver_once(account(dovecot, password_file=None, password_command=f"cat {secret}"))
    assert isinstance(outcome, Delivered)
    assert [m.data for m in dovecot.messages()] == [MESSAGE]


def test_starttls_account_upgrades_the_plain_port_before_logging_in(dovecot: DovecotPeer) -> None:
    outcome = deliver_once(account(dovecot, tls="starttls", port=dovecot.imap_port))
    assert isinstance(outcome, Delivered)
    assert [m.data for m in dovecot.messages()] == [MESSAGE]
    [login] = dovecot.wait_logins(1)[:1]
    assert ", TLS," in login  # Dovecot marks a login made over TLS


def test_wrong_password_is_temporary_and_never_shows_the_password(dovecot: DovecotPeer) -> None:
    wrong = "wr0ng-Pa55word"
    outcome = deliver_once(account(dovecot, password_file=None, password_command=f"echo {wrong}"))
    assert isinstance(outcome, TemporaryFailure)
    assert (outcome.code, outcome.status) == (451, "4.7.0")
    assert "login refused" in outcome.reason and "AUTHENTICATIONFAILED" in outcome.reason
    assert wrong not in outcome.reason and dovecot.password not in outcome.reason
    assert outcome.public == "the mailbox server refused the login"
    assert dovecot.logins() == []


def test_failing_password_command_is_temporary_without_its_output(dovecot: DovecotPeer) -> None:
    outcome = deliver_once(account(dovecot, password_file=None,
                                   password_command="echo gpg: decryption failed; exit 2"))
    assert isinstance(outcome, TemporaryFailure)
    assert (outcome.code, outcome.status) == (451, "4.7.0")
    assert outcome.reason.endswith(": password command exited with status 2")
    assert "decryption" not in outcome.reason
    assert dovecot.logins() == []  # no login was attempted


def test_certificate_for_another_name_is_a_temporary_tls_failure() -> None:
    with running_dovecot(cert_names=("imap.other.test",)) as peer:
        outcome = deliver_once(account(peer))
        assert peer.logins() == []
    assert isinstance(outcome, TemporaryFailure)
    assert (outcome.code, outcome.status) == (451, "4.7.5")
    assert "TLS failed" in outcome.reason and "name mismatch" in outcome.reason
    assert outcome.public == "no secure connection to the mailbox server"


def test_starttls_not_offered_means_no_login_in_plain_text() -> None:
    """A server (or a man in the middle) that does not offer STARTTLS never sees a password."""
    seen: list[bytes] = []

    async def no_starttls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] plain only\r\n")
        try:
            while line := await reader.readline():
                seen.append(line)
                tag = line.split(b" ", 1)[0]
                writer.write(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
        finally:
            writer.close()

    async def main() -> Outcome:
        server = await asyncio.start_server(no_starttls, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        imap = ImapAccount("plain", "127.0.0.1", port, "starttls", "u@example.test", TIMEOUT, 1,
                           password_command="echo secret-password")
        agent = ImapAgent({"plain": imap}, keepalive=IMAP_KEEPALIVE)
        try:
            return (await agent.deliver(job("imap:plain")))["imap:plain"]
        finally:
            await agent.close()
            server.close()
            await server.wait_closed()

    outcome = asyncio.run(main())
    assert isinstance(outcome, TemporaryFailure) and outcome.status == "4.7.5"
    assert "STARTTLS not offered" in outcome.reason
    assert not any(b"LOGIN" in line or b"secret" in line for line in seen)


def test_append_refused_for_quota_is_permanent() -> None:
    with running_dovecot(quota="1k") as peer:
        outcome = deliver_once(account(peer), data=MESSAGE + b"x" * 2000 + b"\r\n")
        assert peer.messages() == []
    assert isinstance(outcome, PermanentFailure)
    assert (outcome.code, outcome.status, outcome.alert) == (552, "5.2.2", False)
    assert "OVERQUOTA" in outcome.reason
    assert outcome.public == "the mailbox is full"


def test_unknown_folder_is_a_permanent_failure_with_an_alert(dovecot: DovecotPeer) -> None:
    outcome = deliver_once(account(dovecot, folder="Detours"))
    assert isinstance(outcome, PermanentFailure)
    assert (outcome.code, outcome.status, outcome.alert) == (550, "5.2.0", True)
    assert "TRYCREATE" in outcome.reason and "'Detours'" in outcome.reason
    assert outcome.public == "the mailbox folder does not exist"


def test_folder_names_are_quoted_and_modified_utf7(dovecot: DovecotPeer) -> None:
    encoded = "D&AOk-tours &- Co"  # "Détours & Co" in modified UTF-7 (RFC 3501 5.1.3)
    dovecot.create_folder(encoded)
    outcome = deliver_once(account(dovecot, folder="Détours & Co"))
    assert isinstance(outcome, Delivered)
    assert [m.data for m in dovecot.messages(encoded)] == [MESSAGE]


def test_warm_connection_is_reused_and_close_logs_out(dovecot: DovecotPeer) -> None:
    async def three(agent: ImapAgent) -> list[Outcome]:
        return [(await agent.deliver(job()))["imap:hidden"] for _ in range(3)]

    outcomes = with_agent({"hidden": account(dovecot)}, three)
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert len(dovecot.messages()) == 3
    assert len(dovecot.wait_logins(1)) == 1  # one login, three APPENDs
    deadline = time.monotonic() + 5
    while "Disconnected: Logged out" not in dovecot.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Disconnected: Logged out" in dovecot.log()  # close() said LOGOUT


def test_connection_closed_by_the_server_while_idle_is_replaced(dovecot: DovecotPeer) -> None:
    """The server ends the idle session (doveadm kick); the next APPEND goes out on it before
    the event loop could notice (the kick blocks the loop), finds it dead before the server
    asked for the message, and is sent once more on a fresh connection: no loss, no double."""

    async def kick_between(agent: ImapAgent) -> list[Outcome]:
        first = (await agent.deliver(job()))["imap:hidden"]
        dovecot.kick()  # blocking on purpose: the agent cannot see the close yet
        second = (await agent.deliver(job()))["imap:hidden"]
        dovecot.kick()
        await asyncio.sleep(0.2)  # this time the agent sees the close while idle
        third = (await agent.deliver(job()))["imap:hidden"]
        return [first, second, third]

    outcomes = with_agent({"hidden": account(dovecot)}, kick_between)
    assert all(isinstance(o, Delivered) for o in outcomes), outcomes
    assert [m.data for m in dovecot.messages()] == [MESSAGE] * 3
    assert len(dovecot.wait_logins(3)) == 3


def test_idle_connection_survives_keepalive_rounds(dovecot: DovecotPeer) -> None:
    async def pause_between(agent: ImapAgent) -> list[Outcome]:
        first = (await agent.deliver(job()))["imap:hidden"]
        await asyncio.sleep(1.0)  # about five NOOPs
        return [first, (await agent.deliver(job()))["imap:hidden"]]

    outcomes = with_agent({"hidden": account(dovecot)}, pause_between, keepalive=0.2)
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert len(dovecot.wait_logins(1)) == 1


def test_parallel_jobs_share_at_most_the_configured_connections(dovecot: DovecotPeer) -> None:
    async def burst(agent: ImapAgent) -> list[Mapping[str, Outcome]]:
        return list(await asyncio.gather(*(agent.deliver(job()) for _ in range(6))))

    results = with_agent({"hidden": account(dovecot, connections=2)}, burst)
    assert all(isinstance(r["imap:hidden"], Delivered) for r in results)
    assert len(dovecot.wait_logins(2)) == 2  # both slots opened one; nothing more
    assert len(dovecot.messages()) == 6


def test_unknown_account_is_a_permanent_failure_with_an_alert(dovecot: DovecotPeer) -> None:
    results = with_agent({"hidden": account(dovecot)}, lambda a: a.deliver(job("imap:nope")))
    outcome = results["imap:nope"]
    assert isinstance(outcome, PermanentFailure) and outcome.alert
    assert (outcome.code, outcome.status) == (550, "5.3.5")


def test_closed_port_and_silent_server_are_temporary_not_unreachable() -> None:
    """The policy must keep retrying an IMAP step until its deadline: never Unreachable."""
    closed_port = free_port()

    async def main() -> Mapping[str, Outcome]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read()  # never greets
            finally:
                writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        quiet = ImapAccount("quiet", "127.0.0.1", server.sockets[0].getsockname()[1], "implicit",
                            "u@example.test", 0.5, 1, password_command="echo x")
        closed = dataclasses.replace(quiet, name="closed", port=closed_port)
        agent = ImapAgent({"quiet": quiet, "closed": closed}, keepalive=IMAP_KEEPALIVE)
        try:
            return await agent.deliver(job("imap:closed", "imap:quiet"))
        finally:
            await agent.close()
            server.close()
            await server.wait_closed()

    results = asyncio.run(main())
    assert results["imap:closed"] == TemporaryFailure(
        f"u@example.test@127.0.0.1:{closed_port}: connection refused", 451, "4.4.1",
        "the mailbox server could not be reached", relay=f"u@example.test@127.0.0.1:{closed_port}")
    stalled = results["imap:quiet"]
    assert isinstance(stalled, TemporaryFailure) and stalled.status == "4.4.1"
    assert "timed out connecting" in stalled.reason


def test_xoauth2_with_a_token_command_re_run_at_each_login() -> None:
    token = "ya29.test-token-0123456789"
    with running_dovecot(oauth2_token=token) as peer:
        runs = peer.base / "runs"
        imap = account(peer, auth="xoauth2", password_file=None,
                       token_command=f"echo run >> {runs}; echo {token}")

        async def twice(agent: ImapAgent) -> list[Outcome]:
            first = (await agent.deliver(job()))["imap:hidden"]
            peer.kick()
            await asyncio.sleep(0.2)
            return [first, (await agent.deliver(job()))["imap:hidden"]]

        outcomes = with_agent({"hidden": imap}, twice)
        assert all(isinstance(o, Delivered) for o in outcomes), outcomes
        assert [m.data for m in peer.messages()] == [MESSAGE] * 2
        assert runs.read_text().split() == ["run", "run"]  # a fresh token for the new login
        assert peer.introspected == [token, token]  # Dovecot's oauth2 passdb checked it
        assert all("method=XOAUTH2" in line for line in peer.wait_logins(2))


def test_xoauth2_with_a_rejected_token_is_a_prompt_temporary_failure() -> None:
    with running_dovecot(oauth2_token="the-right-token") as peer:
        imap = account(peer, auth="xoauth2", password_file=None, token_command="echo expired-token")
        started = time.monotonic()
        outcome = deliver_once(imap)
        elapsed = time.monotonic() - started
        assert peer.introspected == ["expired-token"]
    assert isinstance(outcome, TemporaryFailure)
    assert (outcome.code, outcome.status) == (451, "4.7.0")
    assert "login refused" in outcome.reason and "expired-token" not in outcome.reason
    # The server's SASL error challenge was answered: a NO, not a wait for the timeout.
    assert elapsed < TIMEOUT


def test_probe_says_what_works_or_what_is_wrong() -> None:
    with running_dovecot() as peer:
        good = account(peer)
        ok, line = asyncio.run(probe(good))
        assert ok and "ok" in line and "folder 'INBOX' exists" in line
        ok, line = asyncio.run(probe(dataclasses.replace(good, folder="Missing")))
        assert not ok and "folder 'Missing' cannot be opened" in line
        ok, line = asyncio.run(probe(dataclasses.replace(good, tls="starttls", port=peer.imap_port)))
        assert ok and "starttls" in line
        ok, line = asyncio.run(probe(dataclasses.replace(
            good, password_file=None, password_command="echo not-the-password")))
        assert not ok and "login refused" in line and "not-the-password" not in line
        assert peer.password not in line
        ok, line = asyncio.run(probe(dataclasses.replace(good, host="localhost", ca_file=None)))
        assert not ok and "TLS failed" in line and "not signed by a trusted CA" in line
        ok, line = asyncio.run(probe(dataclasses.replace(good, port=free_port())))
        assert not ok and line.endswith("connection refused")
        assert all("\n" not in text for text in (line,))
    with running_dovecot(cert_names=("imap.other.test",)) as peer:
        ok, line = asyncio.run(probe(account(peer)))
        assert not ok and "TLS failed" in line and "name mismatch" in line


def test_xoauth2_without_sasl_ir_and_appendlimit_against_a_scripted_server(tmp_path: Path) -> None:
    """A server without SASL-IR gets the XOAUTH2 response after its "+"; the exact SASL string
    is checked; a message over the APPENDLIMIT it announces after login is refused here,
    without sending it."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    seen: list[bytes] = []
    expected = b"user=ituki@example.test\x01auth=Bearer ya29.token\x01\x01"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        capabilities = b"IMAP4rev1 AUTH=XOAUTH2"
        writer.write(b"* OK [CAPABILITY " + capabilities + b"] scripted\r\n")
        try:
            await converse(reader, writer, capabilities)
        finally:
            writer.close()

    async def converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       capabilities: bytes) -> None:
        while line := await reader.readline():
            seen.append(line)
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            match rest.split(b" ")[0].upper():
                case b"CAPABILITY":
                    writer.write(b"* CAPABILITY " + capabilities + b"\r\n" + tag + b" OK done\r\n")
                case b"AUTHENTICATE":
                    writer.write(b"+ \r\n")
                    answer = await reader.readline()
                    seen.append(answer)
                    good = base64.b64decode(answer.strip()) == expected
                    writer.write(tag + (b" OK [CAPABILITY IMAP4rev1 APPENDLIMIT=100] in\r\n" if good
                                        else b" NO [AUTHENTICATIONFAILED] no\r\n"))
                case b"LOGOUT":
                    writer.write(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
                case _:
                    writer.write(tag + b" BAD not in this script\r\n")
            await writer.drain()

    async def main() -> Outcome:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
        imap = ImapAccount("scripted", "127.0.0.1", server.sockets[0].getsockname()[1], "implicit",
                           "ituki@example.test", TIMEOUT, 1, auth="xoauth2",
                           token_command="echo ya29.token", ca_file=ca_file)
        agent = ImapAgent({"scripted": imap}, keepalive=IMAP_KEEPALIVE)
        try:
            return (await agent.deliver(job("imap:scripted")))["imap:scripted"]
        finally:
            await agent.close()
            server.close()
            await server.wait_closed()

    outcome = asyncio.run(main())
    assert isinstance(outcome, PermanentFailure)
    assert (outcome.code, outcome.status) == (552, "5.3.4")
    assert f"({len(MESSAGE)} bytes) exceeds the server's APPENDLIMIT 100" in outcome.reason
    authenticate = next(line for line in seen if b"AUTHENTICATE" in line)
    assert authenticate.split(b" ", 1)[1] == b"AUTHENTICATE XOAUTH2\r\n"  # no initial response
    assert base64.b64decode(seen[seen.index(authenticate) + 1].strip()) == expected
    assert not any(b"APPEND" in line for line in seen)


@pytest.mark.parametrize(("result", "text", "kind", "code", "status", "alert"), [
    ("OK", b"[APPENDUID 38505 3955] APPEND completed", Delivered, 250, "2.0.0", False),
    ("NO", b"[TRYCREATE] Mailbox doesn't exist: Detours", PermanentFailure, 550, "5.2.0", True),
    ("NO", b"[NOPERM] Permission denied", PermanentFailure, 550, "5.7.1", True),
    ("NO", b"[OVERQUOTA] Quota exceeded (mailbox for user is full)", PermanentFailure, 552,
     "5.2.2", False),
    ("NO", b"[OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)",
     TemporaryFailure, 451, "4.7.0", False),
    ("NO", b"[LIMIT] Message too large", PermanentFailure, 552, "5.3.4", False),
    ("NO", b"[UNAVAILABLE] Backend down", TemporaryFailure, 451, "4.3.0", False),
    ("NO", b"[SERVERBUG] Internal error occurred", TemporaryFailure, 451, "4.3.0", False),
    ("NO", b"Message rejected by Sieve: spam", PermanentFailure, 550, "5.7.1", False),
    ("NO", b"[ALERT] This message was blocked because its content presents a potential security "
           b"issue", PermanentFailure, 550, "5.7.1", False),
    ("BAD", b"Error in IMAP command APPEND: Invalid arguments.", PermanentFailure, 550, "5.5.2",
     False),
])
def test_tagged_append_replies_map_to_outcomes(result: str, text: bytes, kind: type, code: int,
                                               status: str, alert: bool) -> None:
    outcome = outcome_for_append(Response(result, [b"EXISTS 3", text]), "u@imap.test:993", "INBOX")
    assert isinstance(outcome, kind)
    assert (outcome.code, outcome.status) == (code, status)
    assert getattr(outcome, "alert", False) is alert
    assert outcome.reason.startswith("u@imap.test:993: ")
    if kind is not Delivered:
        assert text.decode() in outcome.reason  # the operator sees the server's words...
        assert "u@" not in outcome.public and text.decode() not in outcome.public  # ...nobody else


def test_appenduid_is_in_the_delivered_reason_and_server_text_is_cleaned() -> None:
    delivered = outcome_for_append(Response("OK", [b"[APPENDUID 38505 3955] done"]), "p", "INBOX")
    assert delivered.reason == "p: appended to 'INBOX' as APPENDUID 38505 3955"
    hostile = outcome_for_append(Response("NO", [b"refused\x1b[31m " + b"x" * 5000]), "p", "INBOX")
    assert "\x1b" not in hostile.reason and len(hostile.reason) < 1100


def test_folder_names_are_always_quoted_and_never_carry_line_breaks() -> None:
    assert mailbox_name("INBOX") == '"INBOX"'
    assert mailbox_name("[Gmail]/All Mail") == '"[Gmail]/All Mail"'
    assert mailbox_name('Say "hi" \\ bye') == '"Say \\"hi\\" \\\\ bye"'
    assert mailbox_name("日本語") == '"&ZeVnLIqe-"'  # RFC 3501 5.1.3's own example
    assert mailbox_name("a\r\nb") == '"a&AA0ACg-b"'
