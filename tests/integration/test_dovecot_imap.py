"""A real Dovecot serves the Maildirs maildetour delivers into over IMAP, next to maildetour's
own POP3 server, and the two agree (docs/imap-with-dovecot.md). Issue 3.

Dovecot refuses mail access as root, so, as in a real installation where maildetour and
Dovecot's mail processes run as one user, the mailbox tree belongs to one unprivileged user
(`nobody` here, because the tests run as root).
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import poplib
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest

from maildetour.config.model import Pop3Settings
from maildetour.mailbox.maildir import deliver, list_messages
from maildetour.pop3.server import Pop3Account, start_pop3
from tests.peers import need, peer_unavailable

ADDRESS = "ituki@gm.example.net"
PASSWORD = "change-me-too"
MESSAGE = b"From: a@example.org\r\nTo: ituki@gm.example.net\r\nSubject: detoured\r\n\r\nhello\r\n"

CONFIG = """\
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{base}/mailboxes/%Lu
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Lu {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home/%Lu
}}
service auth {{
  user = root
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the unprivileged mail user can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="maildetour-dovecot-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@contextmanager
def plain_dovecot(base: Path, passwd: str, extra: str = "") -> Iterator[int]:
    """Dovecot on a loopback port (IMAP, no TLS) with its config and dirs under `base`, its
    passdb the file `base/passwd` holding `passwd`; yields the IMAP port."""
    program = need("dovecot", "dovecot-imapd")
    need("doveadm", "dovecot-core")
    if os.geteuid() != 0:
        peer_unavailable("this Dovecot test runs Dovecot as root (privilege separation)")
    mail_user = pwd.getpwnam("nobody")
    port = free_port()
    config = base / "dovecot.conf"
    config.write_text(CONFIG.format(base=base, uid=mail_user.pw_uid, gid=mail_user.pw_gid, port=port) + extra)
    (base / "passwd").write_text(passwd)
    (base / "mailboxes").mkdir()
    os.chown(base / "mailboxes", mail_user.pw_uid, mail_user.pw_gid)
    process = subprocess.Popen([program, "-F", "-c", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, process)
        yield port
    finally:
        subprocess.run(["doveadm", "-c", str(config), "stop"], capture_output=True, timeout=20)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def dovecot(base: Path) -> Iterator[int]:
    """Dovecot serving our Maildirs' owner with a plain password; the IMAP port."""
    with plain_dovecot(base, f"{ADDRESS}:{{PLAIN}}{PASSWORD}::::::\n") as port:
        yield port


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            peer_unavailable(f"dovecot exited: {process.stderr.read() if process.stderr else ''!r}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    peer_unavailable("dovecot did not start listening")


def give_to_mail_user(path: Path) -> None:
    mail_user = pwd.getpwnam("nobody")
    for directory, _, files in os.walk(path):
        os.chown(directory, mail_user.pw_uid, mail_user.pw_gid)
        for name in files:
            os.chown(os.path.join(directory, name), mail_user.pw_uid, mail_user.pw_gid)


def imap(port: int) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    client.login(ADDRESS.upper(), PASSWORD)  # %Lu: the same lowercased mailbox directory
    client.select("INBOX")
    return client


def pop3_session(root: Path, *commands: str) -> list[bytes]:
    """Run maildetour's POP3 server over `root`; log in; return the reply of each command."""

    def talk(address: tuple[str, int]) -> list[bytes]:
        client = poplib.POP3(*address, timeout=10)
        client.user(ADDRESS)
        client.pass_(PASSWORD)
        replies = []
        for command in commands:
            verb, _, argument = command.partition(" ")
            match verb, argument:
                case "UIDL", "":
                    response, lines, _ = client.uidl()
                    replies.append(response + b"\r\n" + b"\r\n".join(lines))
                case "RETR", number:
                    response, lines, _ = client.retr(int(number))
                    replies.append(response + b"\r\n" + b"\r\n".join(lines))
                case "LIST", number:
                    # with an argument poplib returns the one reply line (typeshed says otherwise)
                    replies.append(cast(bytes, client.list(int(number))))
                case "DELE", number:
                    replies.append(client.dele(int(number)))
        client.quit()
        return replies

    async def scenario() -> list[bytes]:
        server = await start_pop3(
            listen=[("127.0.0.1", 0)], listen_tls=[],
            accounts={ADDRESS: Pop3Account(ADDRESS, root, password=PASSWORD)},
            ssl_context=None, settings=Pop3Settings(failed_login_delay=0),
            hostname="pop.example.test")
        try:
            return await asyncio.to_thread(talk, server.addresses[0])
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(scenario())


def test_dovecot_serves_delivered_mail_and_agrees_with_pop3(base: Path, dovecot: int) -> None:
    root = base / "mailboxes" / ADDRESS
    name = deliver(root, MESSAGE)
    give_to_mail_user(base / "mailboxes")
    [uidl_before] = pop3_session(root, "UIDL")

    # A delivered message is there over IMAP with the same bytes.
    client = imap(dovecot)
    status, data = client.fetch("1", "(BODY.PEEK[])")
    assert status == "OK" and data[0][1] == MESSAGE  # type: ignore[index]

    # Flags set over IMAP move the file to cur/ with ":2,S"; POP3's view does not change.
    assert client.store("1", "+FLAGS", "(\\Seen)")[0] == "OK"
    client.logout()
    assert [m.name for m in list_messages(root)] == [name + ":2,S"]
    uidl_after, retrieved = pop3_session(root, "UIDL", "RETR 1")
    assert uidl_after == uidl_before
    assert uidl_after.endswith(b"\r\n1 " + name.encode())
    assert retrieved.split(b"\r\n", 1)[1] + b"\r\n" == MESSAGE

    # A POP3 DELE (committed by QUIT) is seen by IMAP.
    pop3_session(root, "DELE 1")
    client = imap(dovecot)
    assert client.search(None, "ALL") == ("OK", [b""])

    # And a message stored by Dovecot (IMAP APPEND) is served by POP3 with its exact size.
    appended = b"Subject: saved by IMAP\r\n\r\n.dot\r\n"
    assert client.append("INBOX", None, None, appended)[0] == "OK"
    client.logout()
    listing, retrieved = pop3_session(root, "LIST 1", "RETR 1")
    assert listing == b"+OK 1 %d" % len(appended)
    assert retrieved.split(b"\r\n", 1)[1] + b"\r\n" == appended
