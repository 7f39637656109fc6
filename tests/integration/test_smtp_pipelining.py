"""Outbound PIPELINING (RFC 2920) and CHUNKING (RFC 3030, BDAT; issue 13) against real servers
on loopback: aiosmtpd sinks that advertise PIPELINING, scripted servers (replies held until
DATA and sent in one write, replies one byte at a time, a 354 nobody should get, 421, bytes
that are not replies, a server that checks lock-step), the bench's stand-in gmail (PIPELINING
and CHUNKING, as Gmail's MX), and real Postfix instances (CHUNKING offered by default) with and
without PIPELINING that disconnect a client sending anything after DATA before their 354
(`smtpd_forbid_unauth_pipelining`; Postfix 3.7 does not check lock-step when PIPELINING is not
offered: the scripted server does). Postfix's disconnect log line counts the commands
("bdat=1", "data=1"): that shows which way the message went.

The outcomes expected are those of the lock-step tests in `test_smtp_out.py`.
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from bench.sink import ChunkingSMTP, SinkSettings, StandInGmail
from maildetour.core.outcome import Delivered, Outcome, PermanentFailure, TemporaryFailure
from maildetour.delivery.smtp_out import SmtpAgent
from tests.harness import EICAR
from tests.integration.test_smtp_out import MESSAGE, deliver_once, hops, job, make_agent, with_agent
from tests.peers.postfix import PostfixPeer, running_postfix
from tests.peers.sinks import running_sink

NO_USER = "550 5.1.1 no such user"


def refuse(*prefixes: str) -> Callable[[str], str | None]:
    return lambda address: NO_USER if address.startswith(prefixes) else None


# --- aiosmtpd advertising PIPELINING ----------------------------------------------------------
def test_all_accepted_on_one_connection_without_rset() -> None:
    async def burst(agent: SmtpAgent) -> list[Mapping[str, Outcome]]:
        return [await agent.deliver(job("a@dest.test", "b@dest.test", queue_id=f"Q{i}")) for i in range(3)]

    with running_sink(pipelining=True) as sink:
        results = with_agent(hops(("127.0.0.1", sink.port)), burst)
        received = sink.wait_for(3)
        assert sink.connections == 1
    assert all(isinstance(o, Delivered) for r in results for o in r.values()), results
    assert {m.rcpt_tos for m in received} == {("a@dest.test", "b@dest.test")}
    assert all(m.data == MESSAGE and m.mail_from == "sender@example.com" for m in received)
    assert all(m.mail_options == (f"SIZE={len(MESSAGE)}",) for m in received)


def test_one_rcpt_refused_keeps_its_own_outcome() -> None:
    with running_sink(rcpt=refuse("bob@"), pipelining=True) as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)),
                               job("alice@dest.test", "bob@dest.test", "carol@dest.test"))
        [received] = sink.wait_for(1)
    assert isinstance(results["alice@dest.test"], Delivered)
    assert isinstance(results["carol@dest.test"], Delivered)
    assert results["bob@dest.test"] == PermanentFailure(NO_USER, 550, "5.1.1", "no such mailbox", alert=True,
                                                        relay=f"[127.0.0.1]:{sink.port}")
    assert received.rcpt_tos == ("alice@dest.test", "carol@dest.test")


def test_every_rcpt_refused_then_the_session_serves_the_next_message() -> None:
    async def two(agent: SmtpAgent) -> list[Mapping[str, Outcome]]:
        return [await agent.deliver(job("bob@dest.test", "bo@dest.test")),
                await agent.deliver(job("alice@dest.test", queue_id="Q2"))]

    with running_sink(rcpt=refuse("bo"), pipelining=True) as sink:
        refused, later = with_agent(hops(("127.0.0.1", sink.port)), two)
        [received] = sink.wait_for(1)
        # The first DATA got aiosmtpd's 503 (no recipient) and never reached the handler.
        assert sink.data_attempts == 1 and sink.connections == 1
    assert [(o.code, o.status) for o in refused.values()] == [(550, "5.1.1")] * 2
    assert isinstance(later["alice@dest.test"], Delivered)
    assert received.rcpt_tos == ("alice@dest.test",)


def test_mail_refused_decides_every_recipient() -> None:
    async def two(agent: SmtpAgent) -> list[Mapping[str, Outcome]]:
        return [await agent.deliver(job("a@dest.test", "b@dest.test", mail_from="spam@bad.test")),
                await agent.deliver(job("a@dest.test", queue_id="Q2"))]

    refusal = "550 5.7.1 sender refused"
    with running_sink(mail=lambda a: refusal if a.endswith("@bad.test") else None, pipelining=True) as sink:
        refused, later = with_agent(hops(("127.0.0.1", sink.port)), two)
        [received] = sink.wait_for(1)
        assert sink.connections == 1
    assert refused == {r: PermanentFailure(refusal, 550, "5.7.1", "blocked as likely spam or by policy",
                                           relay=f"[127.0.0.1]:{sink.port}") for r in ("a@dest.test", "b@dest.test")}
    assert isinstance(later["a@dest.test"], Delivered) and received.mail_from == "sender@example.com"


def test_4xx_and_5xx_after_data() -> None:
    dmarc = "550 5.7.26 Unauthenticated email is not accepted due to DMARC policy"
    refuse_marked = lambda data: dmarc if b"DMARC" in data else None  # noqa: E731
    with running_sink(temp_failures=1, pipelining=True, refuse=refuse_marked) as sink:
        later = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test", "b@dest.test"))
        refused = deliver_once(hops(("127.0.0.1", sink.port)), job("a@dest.test", data=MESSAGE + b"DMARC\r\n"))
        assert sink.messages == []
    assert later == {r: TemporaryFailure("451 4.3.0 try again later", 451, "4.3.0", "temporary server problem",
                                         relay=f"[127.0.0.1]:{sink.port}") for r in ("a@dest.test", "b@dest.test")}
    assert refused == {"a@dest.test": PermanentFailure(dmarc, 550, "5.7.26", "unauthenticated / fails DMARC",
                                                       relay=f"[127.0.0.1]:{sink.port}")}


def test_pipelining_over_starttls() -> None:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)

    async def two(agent: SmtpAgent) -> list[Mapping[str, Outcome]]:
        return [await agent.deliver(job("a@dest.test", "bob@dest.test", queue_id=f"Q{i}")) for i in range(2)]

    with running_sink(tls_context=server, rcpt=refuse("bob@"), pipelining=True) as sink:
        results = with_agent(hops(("127.0.0.1", sink.port)), two)
        received = sink.wait_for(2)
        assert sink.connections == 1
    assert all(isinstance(r["a@dest.test"], Delivered) and r["bob@dest.test"].code == 550 for r in results)
    assert all(m.tls and m.data == MESSAGE for m in received)


def test_idle_session_closed_by_the_server_is_replaced() -> None:
    async def apart(agent: SmtpAgent) -> list[Mapping[str, Outcome]]:
        first = await agent.deliver(job("a@dest.test"))
        await asyncio.sleep(0.6)  # the sink's own idle timeout closes the session meanwhile
        return [first, await agent.deliver(job("a@dest.test"))]

    with running_sink(smtp_options={"timeout": 0.2}, pipelining=True) as sink:
        results = with_agent(hops(("127.0.0.1", sink.port)), apart, connection_idle_timeout=30.0)
        sink.wait_for(2)
        assert sink.connections == 2
    assert all(isinstance(r["a@dest.test"], Delivered) for r in results)


def test_smtputf8_and_8bitmime_when_pipelining() -> None:
    data = "From: jörg@example.com\r\nSubject: grüße\r\n\r\nnaïve body\r\n".encode()
    with running_sink(pipelining=True) as sink:
        results = deliver_once(hops(("127.0.0.1", sink.port)),
                               job("ünicode@dest.test", mail_from="jörg@example.com", data=data))
        [received] = sink.wait_for(1)
    assert isinstance(results["ünicode@dest.test"], Delivered)
    assert (received.mail_from, received.rcpt_tos, received.data) == ("jörg@example.com", ("ünicode@dest.test",), data)
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(received.mail_options)


# --- scripted servers ---------------------------------------------------------------------------
@dataclass
class Script:
    """How a scripted server answers; what it saw."""

    pipelining: bool = True
    rcpt: Callable[[str], str] = lambda address: "250 2.1.5 OK"
    mail: str = "250 2.1.0 OK"
    data: str = "354 go ahead"
    end: str = "250 2.0.0 queued"
    hold: bool = False  # answer nothing before DATA, then every reply owed in one write
    trickle: bool = False  # write replies one byte at a time
    garbage: bytes = b""  # written instead of the reply to MAIL
    read_rate: int = 0  # bytes a second it reads a message at (0: as fast as it comes)
    # what it saw
    reads: list[bytes] = field(default_factory=list)  # every read after EHLO, as it came
    commands: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # as received, dot-stuffed, with the "."
    connections: int = 0
    lock_step_broken: bool = False  # a read held more than one command without PIPELINING


async def serve(script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One session of the scripted server; a 421 reply ends it."""
    script.connections += 1
    buffer, body, in_data, held = b"", bytearray(), False, b""

    def wire(reply: str | bytes) -> bytes:
        return reply if isinstance(reply, bytes) else reply.replace("\n", "\r\n").encode() + b"\r\n"

    async def say(reply: str | bytes) -> None:
        wire_ = wire(reply)
        if script.trickle:
            for i in range(len(wire_)):
                writer.write(wire_[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.001)
        else:
            writer.write(wire_)

    def answer(line: bytes) -> str | bytes:
        match line[:4].upper():
            case b"EHLO":
                return "250-fake.test\n" + ("250-PIPELINING\n" if script.pipelining else "") + "250 8BITMIME"
            case b"MAIL":
                return script.garbage or script.mail
            case b"RCPT":
                return script.rcpt(line[9:-1].decode())
            case b"DATA":
                return script.data
            case b"QUIT":
                return "221 bye"
        return "250 OK"

    writer.write(b"220 fake.test ESMTP\r\n")
    try:
        while chunk := await reader.read(65536):
            if not chunk.startswith(b"EHLO"):
                script.reads.append(chunk)
                if not script.pipelining and not in_data and chunk.count(b"\r\n") > 1:
                    script.lock_step_broken = True
            if in_data and script.read_rate:
                await asyncio.sleep(len(chunk) / script.read_rate)
            buffer += chunk
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                if in_data:
                    body += line + b"\r\n"
                    if line == b".":
                        script.bodies.append(bytes(body))
                        body, in_data = bytearray(), False
                        await say(script.end)
                    continue
                script.commands.append(line)
                reply = answer(line)
                if script.hold and line[:4].upper() in (b"MAIL", b"RCPT"):
                    held += wire(reply)
                    continue
                in_data = line.upper() == b"DATA" and script.data.startswith("354")
                await say(held + wire(reply))  # after holding: every reply owed, in one write
                held = b""
                if isinstance(reply, str) and reply.startswith(("421", "221")):
                    await writer.drain()
                    return
            await writer.drain()
    finally:
        writer.close()


def run_scripted(script: Script, use: Callable[[SmtpAgent, int], Awaitable[object]], **settings: object) -> object:
    async def main() -> object:
        listening = socket.socket()
        if script.read_rate:  # a small receive window (no autotuning): the sender waits on us
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        listening.bind(("127.0.0.1", 0))
        server = await asyncio.start_server(lambda r, w: serve(script, r, w), sock=listening)
        port = server.sockets[0].getsockname()[1]
        agent = make_agent(hops(("127.0.0.1", port)), **settings)
        try:
            return await use(agent, port)
        finally:
            await agent.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def deliver_scripted(script: Script, *jobs_: object, **settings: object) -> list[Mapping[str, Outcome]]:
    async def use(agent: SmtpAgent, port: int) -> list[Mapping[str, Outcome]]:
        return [await agent.deliver(j) for j in jobs_]  # type: ignore[arg-type]

    return run_scripted(script, use, **settings)  # type: ignore[return-value]


def test_the_wait_for_the_final_reply_starts_when_the_message_is_sent() -> None:
    """A 16 MB message to a server that reads 4 MB a second takes 4 s to send; data_timeout
    (2.5 s here, 10 min by default) is the wait for the reply after the last byte (RFC 5321
    4.5.3.2.6), not a limit on sending, which is timed per slice by command_timeout."""
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (16 * 1024 * 1024 // 1000)
    script = Script(read_rate=4 * 1024 * 1024)
    [results] = deliver_scripted(script, job("alice@dest.test", data=big), command_timeout=2.5, data_timeout=2.5)
    assert isinstance(results["alice@dest.test"], Delivered), results
    assert len(script.bodies) == 1 and len(script.bodies[0]) == len(big) + 3


def test_a_server_that_stops_reading_times_the_send_out() -> None:
    """A server that takes nothing for command_timeout: the attempt ends (temporary), no hang."""
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (16 * 1024 * 1024 // 1000)
    script = Script(read_rate=10)  # 64 KB then about nothing
    [results] = deliver_scripted(script, job("alice@dest.test", data=big), command_timeout=1.0, data_timeout=600)
    assert isinstance(results["alice@dest.test"], TemporaryFailure), results


def test_commands_go_in_one_write_and_replies_may_all_come_in_one_read() -> None:
    # This server answers nothing before it has DATA: a client that waited for the reply to
    # MAIL would time out. Then it sends the four replies in one write.
    script = Script(hold=True, rcpt=lambda a: NO_USER if a.startswith("bob@") else "250 2.1.5 OK")
    [results] = deliver_scripted(script, job("alice@dest.test", "bob@dest.test"), command_timeout=2.0)
    assert isinstance(results["alice@dest.test"], Delivered)
    assert results["bob@dest.test"].reason == NO_USER
    assert script.reads[0] == ("MAIL FROM:<sender@example.com>\r\n"
                               "RCPT TO:<alice@dest.test>\r\nRCPT TO:<bob@dest.test>\r\nDATA\r\n").encode()
    assert script.bodies == [MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n"]


def test_multi_line_replies_one_byte_at_a_time() -> None:
    gmail_550 = ("550-5.1.1 The email account that you tried to reach does not exist. Please try\n"
                 "550-5.1.1 double-checking the recipient's email address for typos or\n"
                 "550 5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser")
    script = Script(trickle=True, rcpt=lambda a: gmail_550 if a.startswith("bob@") else "250 2.1.5 OK",
                    end="250-2.0.0 OK\n250 2.0.0 queued as 1234")
    [results] = deliver_scripted(script, job("alice@dest.test", "bob@dest.test"))
    assert isinstance(results["alice@dest.test"], Delivered)
    assert results["alice@dest.test"].reason == "250 2.0.0 OK queued as 1234"
    bob = results["bob@dest.test"]
    assert isinstance(bob, PermanentFailure) and bob.alert and bob.status == "5.1.1"
    assert bob.reason.startswith("550 5.1.1 The email account") and bob.reason.endswith("p=NoSuchUser")


def test_354_without_an_accepted_recipient_gets_the_dot_alone() -> None:
    script = Script(rcpt=lambda a: NO_USER, end="554 5.5.1 no valid recipients")
    first, second = deliver_scripted(script, job("bob@dest.test"), job("bob@dest.test", queue_id="Q2"))
    assert first == second
    assert first["bob@dest.test"].reason == NO_USER
    assert script.bodies == [b".\r\n", b".\r\n"]  # never the message
    assert script.connections == 1 and b"RSET" in script.commands  # not clean: RSET before reuse


@pytest.mark.parametrize("pipelining", [True, False])
def test_421_at_rcpt_decides_the_rest_and_closes(pipelining: bool) -> None:
    closing = "421 4.4.5 Server busy, try again later"
    script = Script(pipelining=pipelining, rcpt=lambda a: closing if a.startswith("b@") else "250 2.1.5 OK")
    first, second = deliver_scripted(script, job("a@dest.test", "b@dest.test", "c@dest.test"),
                                     job("a@dest.test", queue_id="Q2"))
    assert {r: (o.code, o.status) for r, o in first.items()} == {r: (421, "4.4.5") for r in first}
    assert all(isinstance(o, TemporaryFailure) for o in first.values())
    assert script.connections == 2  # the session was not reused
    assert isinstance(second["a@dest.test"], Delivered)


def test_bytes_that_are_not_replies_end_the_session() -> None:
    script = Script(garbage=b"hello there\r\n")
    first, second = deliver_scripted(script, job("a@dest.test"), job("a@dest.test", queue_id="Q2"))
    for results in (first, second):
        outcome = results["a@dest.test"]
        assert isinstance(outcome, TemporaryFailure) and outcome.reason.endswith("malformed reply")
        assert "hello" not in outcome.reason
    assert script.connections == 2 and script.bodies == []


def test_without_pipelining_one_command_per_read() -> None:
    script = Script(pipelining=False, rcpt=lambda a: NO_USER if a.startswith("bob@") else "250 2.1.5 OK")
    [results] = deliver_scripted(script, job("alice@dest.test", "bob@dest.test", "carol@dest.test"))
    assert isinstance(results["alice@dest.test"], Delivered) and results["bob@dest.test"].code == 550
    assert not script.lock_step_broken
    assert [c.split(b":")[0] for c in script.commands[1:]] == [b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"RCPT TO",
                                                              b"DATA", b"QUIT"]


# --- real Postfix -------------------------------------------------------------------------------
# "554 5.5.0 Error: SMTP protocol synchronization" and a disconnect for bytes sent after DATA
# before the 354 (or after other commands that must end a group), and a log line saying so.
STRICT = {"smtpd_forbid_unauth_pipelining": "yes"}
POLICY = {
    "smtpd_delay_reject": "no",  # refuse the sender at MAIL, not at the first RCPT
    "smtpd_sender_restrictions": "check_sender_access inline:{ refused@sender.test=REJECT }",
    "smtpd_end_of_data_restrictions":
        "check_sender_access inline:{ {later@sender.test=451 4.3.0 try again later} }",
}
USERS = ("known@gmail.com", "other@gmail.com")


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixPeer]:
    with running_postfix(tmp_path_factory.mktemp("postfix-pipelining"), users=USERS,
                         extra_main_cf={**STRICT, **POLICY}) as peer:
        yield peer


def to_postfix(peer: PostfixPeer, *jobs_: object) -> list[Mapping[str, Outcome]]:
    async def use(agent: SmtpAgent) -> list[Mapping[str, Outcome]]:
        return [await agent.deliver(j) for j in jobs_]  # type: ignore[arg-type]

    results = with_agent(hops((peer.host, peer.port)), use, command_timeout=10.0, data_timeout=10.0)
    assert "synchronization" not in peer.log() and "improper command pipelining" not in peer.log()
    return results


def test_postfix_pipelined_per_recipient_outcomes(postfix: PostfixPeer) -> None:
    accepted, refused_all = to_postfix(postfix, job("known@gmail.com", "nobody@gmail.com", "other@gmail.com"),
                                       job("nobody@gmail.com", "none@gmail.com", queue_id="Q2"))
    assert isinstance(accepted["known@gmail.com"], Delivered) and isinstance(accepted["other@gmail.com"], Delivered)
    for outcome in (accepted["nobody@gmail.com"], *refused_all.values()):
        assert isinstance(outcome, PermanentFailure) and (outcome.code, outcome.status, outcome.alert) == (
            550, "5.1.1", True), outcome
        assert "User unknown" in outcome.reason
    for address in ("known@gmail.com", "other@gmail.com"):
        [message] = postfix.wait_messages(address, 1)
        assert b"\n.a line starting with a dot\n..two dots\n" in message


def test_postfix_refused_mail_and_replies_after_data(postfix: PostfixPeer) -> None:
    mail, virus, later = to_postfix(
        postfix, job("known@gmail.com", "other@gmail.com", mail_from="refused@sender.test"),
        job("known@gmail.com", data=MESSAGE + EICAR + b"\r\n", queue_id="Q2"),
        job("known@gmail.com", "nobody@gmail.com", mail_from="later@sender.test", queue_id="Q3"))
    assert [(type(o), o.code, o.status) for o in mail.values()] == [(PermanentFailure, 554, "5.7.1")] * 2
    assert "Sender address rejected" in mail["known@gmail.com"].reason
    assert virus["known@gmail.com"].reason == "550 5.7.0 message refused: virus found"
    assert isinstance(later["known@gmail.com"], TemporaryFailure)
    assert later["known@gmail.com"].reason.startswith("451 4.3.0") and later["nobody@gmail.com"].code == 550


def test_postfix_without_pipelining_gets_lock_step(tmp_path: Path) -> None:
    with running_postfix(tmp_path / "postfix", users=USERS,
                         extra_main_cf={**STRICT, "smtpd_discard_ehlo_keywords": "pipelining"}) as peer:
        [results] = to_postfix(peer, job("known@gmail.com", "nobody@gmail.com"))
        [message] = peer.wait_messages("known@gmail.com", 1)
    assert isinstance(results["known@gmail.com"], Delivered) and results["nobody@gmail.com"].code == 550
    assert b"..two dots" in message


def commands_used(peer: PostfixPeer, since: int, sessions: int = 1) -> list[str]:
    """The command counts ("ehlo=1 mail=1 rcpt=1 bdat=1 quit=1") of the sessions that ended
    after log offset `since` (waits for `sessions` of them)."""
    deadline = time.monotonic() + 10
    while True:
        found = [used for used in re.findall(r"disconnect from \S+ (.*commands=\S+)", peer.log()[since:])
                 if used != "commands=0/0"]  # running_postfix's probe of the port
        if len(found) >= sessions or time.monotonic() > deadline:
            return found


# A lone "." line, a leading dot, 8-bit text and LF-only line ends: what DATA would stuff and
# normalise; BDAT carries it as one chunk, CRLF and nothing else.
ODD = ("From: a@example.com\nTo: known@gmail.com\nSubject: chunk\nDate: Fri, 27 Nov 2026 20:00:00 +0000\n"
       "Message-ID: <chunk@example.com>\n\n"
       "one\n.\n.leading dot\n..two\nnaïve\nend").encode()


# Over EAGER_BDAT (1 MiB): BDAT goes after the RCPT replies.
BIG = ODD + b"\n" + (b"y" * 76 + b"\n") * 30_000 + b"last"


@pytest.mark.parametrize("data", [ODD, BIG], ids=["eager", "after-rcpt"])
def test_postfix_takes_the_message_by_bdat_byte_exact(postfix: PostfixPeer, data: bytes) -> None:
    since, before = len(postfix.log()), len(postfix.messages("known@gmail.com"))
    [results] = to_postfix(postfix, job("known@gmail.com", data=data, queue_id="Q-bdat"))
    assert isinstance(results["known@gmail.com"], Delivered), results
    [used] = commands_used(postfix, since)
    assert "bdat=1" in used and "data=" not in used and "rset=" not in used, used
    arrived = postfix.wait_messages("known@gmail.com", before + 1)[-1]
    head, _, rest = arrived.partition(b"\nFrom: a@example.com\n")
    assert b"From: a@example.com\n" + rest == data + b"\n"  # Maildir keeps LF; below the Received line byte-exact
    assert all(line.startswith((b"Return-Path:", b"X-Original-To:", b"Delivered-To:", b"Received:", b" ", b"\t"))
               for line in head.split(b"\n")), head


@pytest.mark.parametrize("discard", ["pipelining", "pipelining, chunking"])
def test_postfix_without_pipelining_lock_step_bdat_or_data(tmp_path: Path, discard: str) -> None:
    with running_postfix(tmp_path / "postfix", users=USERS,
                         extra_main_cf={**STRICT, "smtpd_discard_ehlo_keywords": discard}) as peer:
        first, second = to_postfix(peer, job("known@gmail.com", "nobody@gmail.com"),
                                   job("known@gmail.com", data=ODD, queue_id="Q2"))
        [used] = commands_used(peer, 0)
        messages = peer.wait_messages("known@gmail.com", 2)
    assert isinstance(first["known@gmail.com"], Delivered) and first["nobody@gmail.com"].code == 550
    assert isinstance(second["known@gmail.com"], Delivered)
    way = "data=2" if "chunking" in discard else "bdat=2"
    assert way in used and "rset=" not in used, used
    assert any(m.endswith(ODD + b"\n") for m in messages)


# --- the bench's stand-in gmail ------------------------------------------------------------------
@dataclass
class Seen:
    """What the stand-in saw on the wire."""

    reads: list[bytes] = field(default_factory=list)  # every read after the greeting exchange
    connections: int = 0


class Recording(ChunkingSMTP):
    """The stand-in's server, recording what it reads (it offers CHUNKING only when the
    handler's settings say so, as with `--no-chunking`)."""

    def __init__(self, seen: Seen, handler: StandInGmail, timeout: float = 300) -> None:
        super().__init__(handler, hostname="mx.gmail.standin", ident="ESMTP", decode_data=False, timeout=timeout)
        self.seen = seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.seen.connections += 1
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not data.upper().startswith((b"EHLO", b"QUIT")):
            self.seen.reads.append(data)
        super().data_received(data)


def to_standin(chunking: bool, *jobs_: object, timeout: float = 300,
               gap: float = 0.0) -> tuple[list[Mapping[str, Outcome]], Seen, str]:
    """Deliver `jobs_` one after another (`gap` seconds apart) to the stand-in (idle `timeout`)."""
    seen, out = Seen(), io.StringIO()
    handler = StandInGmail(SinkSettings(chunking=chunking), out)

    async def main() -> list[Mapping[str, Outcome]]:
        server = await asyncio.get_running_loop().create_server(
            lambda: Recording(seen, handler, timeout), host="127.0.0.1", port=0)
        port = server.sockets[0].getsockname()[1]
        agent = make_agent(hops(("127.0.0.1", port)), connection_idle_timeout=30.0)
        try:
            results = []
            for j in jobs_:
                results.append(await agent.deliver(j))  # type: ignore[arg-type]
                await asyncio.sleep(gap)
            return results
        finally:
            await agent.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(main()), seen, out.getvalue()


REFUSED_MESSAGE = b"X-Bench-Refuse: yes\r\n" + MESSAGE


def test_standin_refusal_at_bdat_last_then_the_next_message_after_a_pipelined_rset() -> None:
    (refused, later), seen, lines = to_standin(True, job("a@dest.test", data=REFUSED_MESSAGE),
                                               job("a@dest.test", queue_id="Q2"))
    outcome = refused["a@dest.test"]
    assert isinstance(outcome, PermanentFailure) and (outcome.code, outcome.status) == (552, "5.7.0"), outcome
    assert isinstance(later["a@dest.test"], Delivered), later
    assert [line.split()[2] for line in lines.splitlines()] == ["R", "A"]
    assert seen.connections == 1
    # Each transaction is one write: [RSET,] MAIL, RCPT, BDAT LAST and the message, undoubled.
    envelope = b"MAIL FROM:<sender@example.com> SIZE=%d\r\nRCPT TO:<a@dest.test>\r\n"
    assert seen.reads == [
        envelope % len(REFUSED_MESSAGE) + b"BDAT %d LAST\r\n" % len(REFUSED_MESSAGE) + REFUSED_MESSAGE,
        b"RSET\r\n" + envelope % len(MESSAGE) + b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE,
    ]


def test_standin_without_chunking_gets_data() -> None:
    (refused, later), seen, lines = to_standin(False, job("a@dest.test", data=REFUSED_MESSAGE),
                                               job("a@dest.test", queue_id="Q2"))
    assert refused["a@dest.test"].code == 552 and isinstance(later["a@dest.test"], Delivered)
    assert [line.split()[2] for line in lines.splitlines()] == ["R", "A"]
    assert seen.connections == 1 and not any(b"BDAT" in r for r in seen.reads)
    # After the final reply to DATA's message (a 552 too) the session is clean: no RSET.
    assert [r.split(b" ")[0] for r in seen.reads] == [b"MAIL", b"X-Bench-Refuse:", b"MAIL", b"From:"]
    assert all(r.endswith(b"DATA\r\n") for r in seen.reads[::2])


def test_standin_closed_the_idle_session_before_the_pipelined_rset() -> None:
    """A session not clean (refused at BDAT LAST), to be reused with a pipelined RSET, that the
    server closed while idle: the next message goes on a fresh connection."""
    (refused, later), seen, lines = to_standin(True, job("a@dest.test", data=REFUSED_MESSAGE),
                                               job("a@dest.test", queue_id="Q2"), timeout=0.2, gap=0.6)
    assert refused["a@dest.test"].code == 552 and isinstance(later["a@dest.test"], Delivered), later
    assert [line.split()[2] for line in lines.splitlines()] == ["R", "A"]
    assert seen.connections == 2
