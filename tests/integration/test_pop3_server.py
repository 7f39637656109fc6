"""maildetour's POP3 server over loopback with real clients: Python poplib (plain, STLS,
implicit TLS with a trustme CA), getmail6, and hostile raw sockets. Issue 3."""

from __future__ import annotations

import asyncio
import os
import poplib
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import trustme

from maildetour.core.password import hash_password
from maildetour.mailbox.maildir import deliver, list_messages
from maildetour.pop3.server import Pop3Account, Pop3Server, start_pop3
from maildetour.config.model import Pop3Settings
from tests.peers import need

T = TypeVar("T")
ADDRESS = "ituki@gm.example.net"
PASSWORD = "change-me-too"
FAST = Pop3Settings(failed_login_delay=0)
MESSAGE_1 = b"From: a@example.org\r\nSubject: one\r\n\r\nfirst body\r\n.starts with a dot\r\n"
MESSAGE_2 = b"From: b@example.org\nSubject: two\n\nLF-only body\n..two dots\nlast line"


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) from a throwaway CA; the cert names 127.0.0.1."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "pop.example.test").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def mailbox(tmp_path: Path) -> Path:
    return tmp_path / "mailboxes" / ADDRESS


def accounts(root: Path, **credentials: str) -> dict[str, Pop3Account]:
    if not credentials:
        credentials = {"password": PASSWORD}
    return {ADDRESS: Pop3Account(address=ADDRESS, maildir=root, **credentials)}


@asynccontextmanager
async def pop3(root: Path, *, settings: Pop3Settings = FAST, tls_listener: bool = False,
               ssl_context: ssl.SSLContext | None = None,
               **credentials: str) -> AsyncIterator[Pop3Server]:
    server = await start_pop3(
        listen=[("127.0.0.1", 0)], listen_tls=[("127.0.0.1", 0)] if tls_listener else [],
        accounts=accounts(root, **credentials), ssl_context=ssl_context, settings=settings,
        hostname="pop.example.test")
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


def run(scenario: Callable[[], object]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


async def in_thread(function: Callable[..., T], *args: object, **kwargs: object) -> T:
    return await asyncio.to_thread(function, *args, **kwargs)


def login(server: Pop3Server, user: str = ADDRESS, password: str = PASSWORD) -> poplib.POP3:
    host, port = server.addresses[0]
    client = poplib.POP3(host, port, timeout=10)
    client.user(user)
    client.pass_(password)
    return client


def retr(client: poplib.POP3, number: int) -> bytes:
    return b"\r\n".join(client.retr(number)[1]) + b"\r\n"


# --- poplib, plain -------------------------------------------------------------------------
def test_retrieve_and_delete_with_poplib(tmp_path: Path) -> None:
    root = mailbox(tmp_path)
    deliver(root, MESSAGE_1)
    deliver(root, MESSAGE_2)

    def session(server: Pop3Server) -> None:
        client = login(server, user=ADDRESS.upper())  # addresses match in any case
        count, size = client.stat()
        assert count == 2
        assert retr(client, 1) == MESSAGE_1
        assert retr(client, 2) == MESSAGE_2.replace(b"\n", b"\r\n") + b"\r\n"
        listed = [int(line.split()[1]) for line in client.list()[1]]
        assert listed == [len(MESSAGE_1), len(retr(client, 2))] and size == sum(listed)
        head = client.top(1, 99999999)[1]  # fetchmail's way of asking for everything
        assert b"\r\n".join(head) + b"\r\n" == MESSAGE_1
        assert client.top(2, 0)[1] == [b"From: b@example.org", b"Subject: two", b""]
        client.dele(1)
        assert client.quit().startswith(b"+OK")

    async def scenario() -> None:
        async with pop3(root) as server:
            await in_thread(session, server)
        crlf_size = len(MESSAGE_2.replace(b"\n", b"\r\n")) + 2  # + CRLF after the last line
        assert [m.size for m in list_messages(root)] == [crlf_size]

    run(scenario)


def test_uidls_are_stable_across_sessions_and_restarts(tmp_path: Path) -> None:
    root = mailbox(tmp_path)
    names = [deliver(root, MESSAGE_1), deliver(root, MESSAGE_2)]

    def uidls(server: Pop3Server) -> list[bytes]:
        client = login(server)
        try:
            return [line.split()[1] for line in client.uidl()[1]]
        finally:
            client.quit()

    async def scenario() -> list[list[bytes]]:
        seen = []
        for _ in range(2):  # two server instances, two sessions each
            async with pop3(root) as server:
                seen += [await in_thread(uidls, server), await in_thread(uidls, server)]
        return seen

    seen = asyncio.run(scenario())
    assert all(s == seen[0] for s in seen)
    assert sorted(seen[0]) == sorted(n.encode() for n in names)


def test_a_dropped_connection_deletes_nothing(tmp_path: Path) -> None:
    root = mailbox(tmp_path)
    deliver(root, MESSAGE_1)

    def drop(server: Pop3Server) -> None:
        client = login(server)
        client.dele(1)
        client.sock.shutdown(socket.SHUT_RDWR)  # no QUIT
        client.close()

    async def scenario() -> None:
        async with pop3(root) as server:
            await in_thread(drop, server)
            await asyncio.sleep(0.05)
            assert len(list_messages(root)) == 1
            client = await in_thread(login, server)  # and the lock was released
            assert (await in_thread(client.stat))[0] == 1
            await in_thread(client.quit)

    run(scenario)


def test_session_sees_a_snapshot_taken_at_login(tmp_path: Path) -> None:
    root = mailbox(tmp_path)
    deliver(root, MESSAGE_1)

    async def scenario() -> None:
        async with pop3(root) as server:
            client = await in_thread(login, server)
            deliver(root, MESSAGE_2)
            assert (await in_thread(client.stat))[0] == 1
            assert len((await in_thread(client.uidl))[1]) == 1
            await in_thread(client.quit)
            client = await in_thread(login, server)
            assert (await in_thread(client.stat))[0] == 2
            await in_thread(client.quit)

    run(scenario)


def test_mailbox_is_locked_while_a_session_holds_it(tmp_path: Path) -> None:
    root = mailbox(tmp_path)

    async def scenario() -> None:
        async with pop3(root, password_hash=hash_password(PASSWORD)) as server:
            first = await in_thread(login, server)
            with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                await in_thread(login, server)
            await in_thread(first.quit)
            second = await in_thread(login, server)
            await in_thread(second.quit)

    run(scenario)


def test_large_mailbox_lists_and_serves(tmp_path: Path) -> None:
    root = mailbox(tmp_path)
    sample = deliver(root, b"Subject: 0\r\n\r\nbody\r\n")
    stem, sizes = sample.split(",", 1)
    for i in range(1, 10_000):  # deliver()'s naming scheme, without 10,000 fsyncs
        (root / "new" / f"{stem}x{i},{sizes}").write_bytes(b"Subject: %d\r\n\r\nbody\r\n" % (i % 10))

    def session(server: Pop3Server) -> None:
        client = login(server)
        assert client.stat()[0] == 10_000
        assert len(client.list()[1]) == 10_000
        assert len({line.split()[1] for line in client.uidl()[1]}) == 10_000
        assert retr(client, 10_000).endswith(b"\r\n\r\nbody\r\n")
        client.quit()

    async def scenario() -> None:
        async with pop3(root) as server:
            await in_thread(session, server)

    run(scenario)


# --- TLS -----------------------------------------------------------------------------------
def test_stls_then_login(tmp_path: Path, tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    root = mailbox(tmp_path)
    deliver(root, MESSAGE_1)
    server_context, client_context = tls

    def session(server: Pop3Server) -> None:
        host, port = server.addresses[0]
        client = poplib.POP3(host, port, timeout=10)
        assert "STLS" in client.capa()
        client.stls(context=client_context)
        assert "STLS" not in client.capa()
        client.user(ADDRESS)
        client.pass_(PASSWORD)
        assert retr(client, 1) == MESSAGE_1
        client.quit()

    async def scenario() -> None:
        async with pop3(root, ssl_context=server_context) as server:
            await in_thread(session, server)

    run(scenario)


def test_implicit_tls_listener(tmp_path: Path, tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    root = mailbox(tmp_path)
    deliver(root, MESSAGE_1)
    server_context, client_context = tls

    def session(server: Pop3Server) -> None:
        host, port = server.tls_addresses[0]
        client = poplib.POP3_SSL(host, port, context=client_context, timeout=10)
        assert "STLS" not in client.capa()
        client.user(ADDRESS)
        client.pass_(PASSWORD)
        assert client.stat()[0] == 1 and retr(client, 1) == MESSAGE_1
        client.quit()

    async def scenario() -> None:
        async with pop3(root, ssl_context=server_context, tls_listener=True) as server:
            await in_thread(session, server)

    run(scenario)


def test_commands_pipelined_behind_stls_are_dropped(
        tmp_path: Path, tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls

    def session(server: Pop3Server) -> bytes:
        with socket.create_connection(server.addresses[0], timeout=10) as raw:
            lines = raw.makefile("rb")
            lines.readline()
            raw.sendall(b"STLS\r\nQUIT\r\n")  # the QUIT must not be obeyed after TLS starts
            assert lines.readline().startswith(b"+OK")
            with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as secure:
                secure.sendall(b"NOOP\r\n")
                return secure.recv(1000)

    async def scenario() -> None:
        async with pop3(mailbox(tmp_path), ssl_context=server_context) as server:
            assert await in_thread(session, server) == b"-ERR command not valid in this state\r\n"

    run(scenario)


# --- bad input -----------------------------------------------------------------------------
def talk(server: Pop3Server, payload: bytes) -> bytes:
    """Send raw bytes, then read until the server closes or goes quiet."""
    with socket.create_connection(server.addresses[0], timeout=10) as raw:
        raw.sendall(payload)
        raw.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := raw.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_bad_input_gets_err_and_the_server_keeps_serving(tmp_path: Path) -> None:
    root = mailbox(tmp_path)
    deliver(root, MESSAGE_1)
    binary = bytes(range(11, 256)) * 3 + bytes(range(0, 10))  # no LF inside: one "line"
    junk = binary + b"\r\nHELO x\r\nRETR 1\r\n" + b"A" * 5000 + b"\r\nCAPA\r\n"

    async def scenario() -> None:
        async with pop3(root) as server:
            replies = (await in_thread(talk, server, junk)).split(b"\r\n")
            assert replies[0].startswith(b"+OK pop.example.test")
            errors = [r for r in replies if r.startswith(b"-ERR")]
            assert b"-ERR line too long" in errors
            assert b"-ERR unknown command" in errors
            assert b"-ERR command not valid in this state" in errors
            assert b"+OK capability list follows" in replies
            endless = await in_thread(talk, server, b"junk\r\n" * 100)
            assert endless.endswith(b"-ERR too many bad commands, closing\r\n")
            client = await in_thread(login, server)
            assert await in_thread(retr, client, 1) == MESSAGE_1
            await in_thread(client.quit)

    run(scenario)


def test_wrong_passwords_are_throttled_per_client(tmp_path: Path) -> None:
    settings = Pop3Settings(failed_login_delay=0, max_failures_per_client=3)

    async def scenario() -> None:
        async with pop3(mailbox(tmp_path), settings=settings) as server:
            replies = await in_thread(talk, server, b"USER " + ADDRESS.encode() + b"\r\n"
                                      + b"PASS wrong\r\n" + b"USER nobody@example.net\r\n"
                                      + b"PASS wrong\r\n" + b"AUTH PLAIN AHgAeQ==\r\n")
            assert replies.count(b"-ERR [AUTH] authentication failed") == 3
            assert replies.endswith(b", closing\r\n")
            # Now even the right password is refused from this address, in the same words.
            with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\] authentication failed'$"):
                await in_thread(login, server)

    run(scenario)


def test_idle_sessions_are_logged_out_and_extra_connections_refused(tmp_path: Path) -> None:
    settings = Pop3Settings(failed_login_delay=0, idle_timeout=0.2, max_connections=1)

    async def scenario() -> None:
        async with pop3(mailbox(tmp_path), settings=settings) as server:
            reader, writer = await asyncio.open_connection(*server.addresses[0])
            assert (await reader.readline()).startswith(b"+OK")
            extra = await in_thread(talk, server, b"")
            assert extra == b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
            assert await asyncio.wait_for(reader.read(), 10) == (
                b"-ERR autologout: idle for too long\r\n")
            writer.close()

    run(scenario)


# --- getmail6 ------------------------------------------------------------------------------
@pytest.fixture
def getmail_dir() -> Iterator[Path]:
    """A directory getmail can deliver into as `nobody` (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="maildetour-getmail-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def getmail(program: str, base: Path, server: Pop3Server, *, delete: bool) -> None:
    host, port = server.addresses[0]
    destination = base / "fetched"
    for sub in ("", "tmp", "new", "cur"):
        (destination / sub).mkdir(exist_ok=True)
        (destination / sub).chmod(0o777)
    as_user = "user = nobody\n" if os.geteuid() == 0 else ""
    rc = base / "getmailrc"
    rc.write_text(
        "[retriever]\ntype = SimplePOP3Retriever\n"
        f"server = {host}\nport = {port}\nusername = {ADDRESS}\npassword = {PASSWORD}\n"
        f"[destination]\ntype = Maildir\npath = {destination}/\n{as_user}"
        f"[options]\nverbose = 0\nread_all = {delete}\ndelete = {delete}\n"
        "delivered_to = false\nreceived = false\n")
    state = base / "state"
    state.mkdir(exist_ok=True)
    result = subprocess.run([program, f"--rcfile={rc}", f"--getmaildir={state}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def fetched(base: Path) -> list[bytes]:
    """Messages getmail stored, without the Return-Path line it adds on top."""
    stored = [p.read_bytes() for p in (base / "fetched" / "new").iterdir()]
    return sorted(m.removeprefix(b"Return-Path: <unknown>\n") for m in stored)


def test_getmail_retrieves_into_a_maildir_and_deletes(tmp_path: Path, getmail_dir: Path) -> None:
    program = need("getmail", "getmail6")
    root = mailbox(tmp_path)
    deliver(root, MESSAGE_1)
    deliver(root, MESSAGE_2)

    async def scenario() -> None:
        async with pop3(root) as server:
            await in_thread(getmail, program, getmail_dir, server, delete=True)

    run(scenario)
    assert fetched(getmail_dir) == sorted([MESSAGE_1.replace(b"\r\n", b"\n"), MESSAGE_2 + b"\n"])
    assert list_messages(root) == []


def test_getmail_leaves_mail_on_the_server_and_fetches_only_new_by_uidl(
        tmp_path: Path, getmail_dir: Path) -> None:
    program = need("getmail", "getmail6")
    root = mailbox(tmp_path)
    deliver(root, MESSAGE_1)

    async def scenario() -> None:
        async with pop3(root) as server:
            await in_thread(getmail, program, getmail_dir, server, delete=False)
            assert len(fetched(getmail_dir)) == 1
            await in_thread(getmail, program, getmail_dir, server, delete=False)
            assert len(fetched(getmail_dir)) == 1  # nothing new: nothing fetched again
            deliver(root, MESSAGE_2)
            await in_thread(getmail, program, getmail_dir, server, delete=False)

    run(scenario)
    assert fetched(getmail_dir) == sorted([MESSAGE_1.replace(b"\r\n", b"\n"), MESSAGE_2 + b"\n"])
    assert len(list_messages(root)) == 2
