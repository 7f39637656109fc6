"""Issue 14: the LMTP agent against scripted LMTP servers on loopback (TCP and a Unix socket),
for what a real Dovecot does not do on request: drop the connection between two recipients'
final replies, close an idle connection, stall, or be absent; and what is refused before a
message goes (an international sender, every recipient unknown). The real Dovecot is in
test_lmtp_dovecot.py."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from maildetour.config.model import DeliveryConfig, LmtpServer
from maildetour.core.hostport import HostPort
from maildetour.core.outcome import Delivered, PermanentFailure, TemporaryFailure
from maildetour.delivery.base import Job
from maildetour.delivery.lmtp import LmtpAgent
from tests.peers.ports import free_port

SETTINGS = DeliveryConfig(connect_timeout=2.0, command_timeout=2.0, data_timeout=2.0, connection_idle_timeout=5.0)
DATA = b"Received: from client.test\r\nSubject: hi\r\n\r\n.a line with a dot\r\nbye\r\n"


def job(*recipients: str, data: bytes = DATA) -> Job:
    return Job("Q1", "alice@sender.example", recipients, data, 0.0)


@dataclass
class Script:
    """How the scripted store answers, and what it saw."""

    rcpt: Callable[[str], bytes] = lambda address: b"250 2.1.5 OK"
    final: Callable[[str], bytes] = lambda address: b"250 2.0.0 <%s> Saved" % address.encode()
    drop_after_finals: int | None = None  # close the connection after this many final replies
    final_delay: float = 0.0
    connections: int = 0
    lines: list[bytes] = field(default_factory=list)  # every command line
    messages: list[bytes] = field(default_factory=list)  # the message bytes as received (dot-stuffed)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        accepted: list[str] = []
        try:
            writer.write(b"220 store.test LMTP ready\r\n")
            while line := await reader.readline():
                self.lines.append(line)
                verb = line[:4].upper()
                if verb == b"LHLO":
                    writer.write(b"250-store.test\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n")
                elif verb == b"MAIL":
                    accepted = []
                    writer.write(b"250 2.1.0 OK\r\n")
                elif verb == b"RCPT":
                    address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                    reply = self.rcpt(address)
                    if reply.startswith(b"250"):
                        accepted.append(address)
                    writer.write(reply + b"\r\n")
                elif verb == b"DATA" and not accepted:
                    writer.write(b"503 5.5.1 No valid recipients\r\n")  # RFC 2033 4.2
                elif verb == b"DATA":
                    writer.write(b"354 OK\r\n")
                    await writer.drain()
                    message = b""
                    while (chunk := await reader.readline()) != b".\r\n":
                        message += chunk
                    self.messages.append(message)
                    for i, address in enumerate(accepted):
                        if self.drop_after_finals is not None and i >= self.drop_after_finals:
                            writer.close()
                            return
                        await asyncio.sleep(self.final_delay)
                        writer.write(self.final(address) + b"\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 2.0.0 OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def scripted(script: Script, *, unix: Path | None = None) -> AsyncIterator[LmtpServer]:
    if unix is not None:
        server = await asyncio.start_unix_server(script.serve, path=str(unix))
        where = LmtpServer(socket=unix)
    else:
        server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
        where = LmtpServer(address=HostPort("127.0.0.1", server.sockets[0].getsockname()[1]))
    try:
        yield where
    finally:
        server.close()
        for writer in script.writers:
            writer.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="md-lmtp-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_one_transaction_each_recipient_its_own_outcome_the_bytes_unchanged() -> None:
    refusals = {"nobody@pc.test": b"550 5.1.1 <nobody@pc.test> User doesn't exist: nobody@pc.test"}
    finals = {"full@pc.test": b"552 5.2.2 <full@pc.test> Quota exceeded (mailbox for user is full)",
              "busy@pc.test": b"451 4.3.0 <busy@pc.test> Temporary internal error"}
    script = Script(rcpt=lambda a: refusals.get(a, b"250 2.1.5 OK"),
                    final=lambda a: finals.get(a, b"250 2.0.0 <%s> Saved" % a.encode()))

    async def scenario() -> dict[str, object]:
        async with scripted(script) as server:
            agent = LmtpAgent(server=server, local_hostname="mx.example.com", settings=SETTINGS)
            try:
                return dict(await agent.deliver(job("a@pc.test", "nobody@pc.test", "full@pc.test", "busy@pc.test")))
            finally:
                await agent.close()

    outcomes = asyncio.run(scenario())
    assert isinstance(outcomes["a@pc.test"], Delivered)
    assert outcomes["a@pc.test"].reason == "250 2.0.0 <a@pc.test> Saved"
    assert outcomes["a@pc.test"].relay.startswith("lmtp:[127.0.0.1]:")
    nobody = outcomes["nobody@pc.test"]
    assert isinstance(nobody, PermanentFailure) and nobody.alert and nobody.status == "5.1.1"
    full = outcomes["full@pc.test"]
    assert isinstance(full, PermanentFailure) and (full.code, full.status) == (552, "5.2.2") and not full.alert
    assert isinstance(outcomes["busy@pc.test"], TemporaryFailure)
    assert script.lines[0] == b"LHLO mx.example.com\r\n"
    assert script.lines[1] == b"MAIL FROM:<alice@sender.example>\r\n"
    assert [line for line in script.lines if line.startswith(b"RCPT")] == [
        b"RCPT TO:<a@pc.test>\r\n", b"RCPT TO:<nobody@pc.test>\r\n", b"RCPT TO:<full@pc.test>\r\n",
        b"RCPT TO:<busy@pc.test>\r\n"]
    # What went over the wire is the job's bytes, dot-stuffed; nothing added in front.
    assert script.messages == [DATA.replace(b"\r\n.a", b"\r\n..a")]
    assert script.connections == 1


def test_the_connection_is_kept_for_the_next_job_unless_idle_timeout_is_0(socket_dir: Path) -> None:
    async def two_jobs(settings: DeliveryConfig, script: Script, unix: Path) -> list[object]:
        async with scripted(script, unix=unix) as server:
            agent = LmtpAgent(server=server, local_hostname="mx.example.com", settings=settings)
            try:
                first = await agent.deliver(job("a@pc.test"))
                second = await agent.deliver(job("b@pc.test"))
                return [first["a@pc.test"], second["b@pc.test"]]
            finally:
                await agent.close()

    kept = Script()
    outcomes = asyncio.run(two_jobs(SETTINGS, kept, socket_dir / "kept"))
    assert all(isinstance(o, Delivered) for o in outcomes), outcomes
    assert kept.connections == 1
    assert [line[:4] for line in kept.lines].count(b"LHLO") == 1
    assert kept.lines[-1] == b"QUIT\r\n"  # close() says goodbye to the idle connection
    assert outcomes[0].relay == f"lmtp:{socket_dir / 'kept'}"  # type: ignore[attr-defined]

    fresh = Script()
    no_reuse = DeliveryConfig(connect_timeout=2.0, command_timeout=2.0, data_timeout=2.0, connection_idle_timeout=0)
    outcomes = asyncio.run(two_jobs(no_reuse, fresh, socket_dir / "fresh"))
    assert all(isinstance(o, Delivered) for o in outcomes) and fresh.connections == 2


def test_what_the_store_could_never_take_is_refused_here_and_a_refused_transaction_is_not_reused() -> None:
    """An international sender at a store without SMTPUTF8 (Dovecot 2.3): refused by us, nothing
    sent, the connection kept. Every recipient refused: no message goes (the store says 503 to
    DATA), and the connection is closed rather than reused."""
    unknown = ("x@pc.test", "y@pc.test")
    script = Script(rcpt=lambda a: b"550 5.1.1 <%s> User doesn't exist" % a.encode() if a in unknown
                    else b"250 2.1.5 OK")

    async def scenario() -> list[dict[str, object]]:
        async with scripted(script) as server:
            agent = LmtpAgent(server=server, local_hostname="mx.example.com", settings=SETTINGS)
            try:
                utf8 = Job("Q1", "jörg@sender.example", ("a@pc.test",), DATA, 0.0)
                return [dict(await agent.deliver(utf8)), dict(await agent.deliver(job("x@pc.test", "y@pc.test"))),
                        dict(await agent.deliver(job("z@pc.test")))]
            finally:
                await agent.close()

    utf8, refused, third = asyncio.run(scenario())
    international = utf8["a@pc.test"]
    assert isinstance(international, PermanentFailure) and (international.code, international.status) == (550, "5.6.7")
    assert all(isinstance(o, PermanentFailure) and o.status == "5.1.1" and o.alert for o in refused.values())
    assert isinstance(third["z@pc.test"], Delivered)
    verbs = [line[:4] for line in script.lines]
    # LHLO, then no MAIL for the first job; MAIL RCPT RCPT DATA for the second; a new
    # connection (LHLO) for the third, kept idle until close() says QUIT.
    assert verbs == [b"LHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b"LHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    assert len(script.messages) == 1 and script.connections == 2


def test_a_connection_lost_between_final_replies_keeps_what_was_saved() -> None:
    script = Script(drop_after_finals=1)

    async def scenario() -> dict[str, object]:
        async with scripted(script) as server:
            agent = LmtpAgent(server=server, local_hostname="mx.example.com", settings=SETTINGS)
            try:
                return dict(await agent.deliver(job("a@pc.test", "b@pc.test")))
            finally:
                await agent.close()

    outcomes = asyncio.run(scenario())
    assert isinstance(outcomes["a@pc.test"], Delivered)  # saved: not sent again
    lost = outcomes["b@pc.test"]
    assert isinstance(lost, TemporaryFailure) and "connection lost" in lost.reason


def test_an_idle_connection_the_store_closed_is_replaced_once() -> None:
    script = Script()

    async def scenario() -> list[object]:
        async with scripted(script) as server:
            agent = LmtpAgent(server=server, local_hostname="mx.example.com", settings=SETTINGS)
            try:
                first = await agent.deliver(job("a@pc.test"))
                for writer in script.writers:  # the store closes the idle connection
                    writer.close()
                await asyncio.sleep(0.1)
                second = await agent.deliver(job("b@pc.test"))
                return [first["a@pc.test"], second["b@pc.test"]]
            finally:
                await agent.close()

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, Delivered) for o in outcomes), outcomes
    assert script.connections == 2 and len(script.messages) == 2


def test_the_store_down_or_stalled_is_temporary_never_unreachable(socket_dir: Path) -> None:
    async def deliver(server: LmtpServer, settings: DeliveryConfig = SETTINGS) -> object:
        agent = LmtpAgent(server=server, local_hostname="mx.example.com", settings=settings)
        try:
            return (await agent.deliver(job("a@pc.test")))["a@pc.test"]
        finally:
            await agent.close()

    port = free_port()
    refused = asyncio.run(deliver(LmtpServer(address=HostPort("127.0.0.1", port))))
    assert isinstance(refused, TemporaryFailure) and refused.code == 451, refused
    assert refused.reason == f"lmtp:[127.0.0.1]:{port}: ECONNREFUSED"
    assert refused.public == "the mailbox store cannot be reached now"
    no_socket = asyncio.run(deliver(LmtpServer(socket=socket_dir / "absent")))
    assert isinstance(no_socket, TemporaryFailure) and f"lmtp:{socket_dir / 'absent'}" in no_socket.reason

    async def stalled() -> object:
        script = Script(final_delay=1.0)
        async with scripted(script) as server:
            quick = DeliveryConfig(connect_timeout=2.0, command_timeout=2.0, data_timeout=0.2)
            return await deliver(server, quick)

    timed_out = asyncio.run(stalled())
    assert isinstance(timed_out, TemporaryFailure) and "timed out" in timed_out.reason
