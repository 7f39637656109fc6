"""Issue 14, mailboxes across nodes: with `[delivery] lmtp` the real `maildetour serve` hands
every mailbox copy to a real Dovecot by LMTP (Debian `dovecot-lmtpd`), which stores it and
serves it over IMAP; maildetour writes no Maildir of its own.

- The seed scenario over LMTP (Dovecot's Unix socket): the public address's copy lands in the
  PC mailbox in Dovecot, read back over IMAP byte for byte below our Received line; a copy
  Gmail refuses detours into the GM mailbox, also in Dovecot.
- One transaction, one reply per recipient (TCP): to three mailboxes at once, one Dovecot does
  not know (550 5.1.1 at RCPT) and one over its quota (552 5.2.2 after the message): only those
  two are refused (then a private DSN), the third is stored; two messages, one connection.
- Over quota on a hidden chain's last step (552): quarantined, no DSN.
- Dovecot down (no socket): temporary, retried, delivered once Dovecot is up; one copy.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Server, message, running_server
from tests.peers.dovecot import DovecotPeer, StoredMessage, running_dovecot
from tests.peers.sinks import running_sink

PC = "ituki@pc.example.net"
GM = "ituki@gm.example.net"
HIDDEN = "ituki-ex@gmail.com"
UNKNOWN = "nobody@pc.example.net"  # a mailbox of ours that Dovecot does not know
FULL = "full@pc.example.net"  # a mailbox whose quota at Dovecot is 1 KB
TEAM = "team@example.com"
VIRUS = "552 5.7.0 This message was blocked because its content presents a potential security issue."


def refuse_marked(data: bytes) -> str | None:
    return VIRUS if b"X-Refuse: yes" in data else None


def lmtp_extra(lmtp: str) -> dict[str, str | None]:
    """The seed as one of several nodes: no POP3 of ours, mailboxes by LMTP."""
    return {"pop3": None, "delivery_extra": f'lmtp = "{lmtp}"\nretry_first = "300ms"'}


def unix(dovecot: DovecotPeer) -> str:
    assert dovecot.lmtp_socket is not None
    return f"unix:{dovecot.lmtp_socket}"


def wait_messages(dovecot: DovecotPeer, user: str, count: int, timeout: float = 15.0) -> list[StoredMessage]:
    deadline = time.monotonic() + timeout
    while len(found := dovecot.messages(user=user)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(found) >= count, f"{user}: {len(found)} of {count} messages\n{dovecot.log()[-2000:]}"
    return found


def below_our_received(stored: bytes) -> bytes:
    """The stored message from our Received line on (Dovecot puts Return-Path and its own
    Received above it)."""
    start = stored.index(b"Received: from client.test")
    return stored[start:]


def reply(detail: str) -> str:
    """An attempt's event detail without its "attempt N: " in front: the store's reply."""
    return re.sub(r"^attempt \d+: ", "", detail)


def no_maildirs(server: Server) -> None:
    assert not (server.state / "mailboxes").exists(), "a node with lmtp must write no Maildir"


def test_the_seed_scenario_over_lmtp_and_a_refused_copy_detours_into_dovecot(tmp_path: Path) -> None:
    with running_dovecot(user=PC, more_users=[GM], lmtp=True) as dovecot, \
            running_sink(refuse=refuse_marked) as gmail, \
            running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}", **lmtp_extra(unix(dovecot))) as server:
        sent = message("seed over lmtp")
        queue_id = server.send(sent)
        [pc_copy] = wait_messages(dovecot, PC, 1)
        [hidden_copy] = gmail.wait_for(1)
        events = server.wait_event(queue_id, "delivered", target=PC)

        refused = message("refused by gmail", extra_headers="X-Refuse: yes\r\n")
        refused_id = server.send(refused)
        [detoured] = wait_messages(dovecot, GM, 1)
        detour_events = server.wait_event(refused_id, "delivered", target=GM)
        trace = server.cli("trace", refused_id).stdout
        check = server.cli("check")
        pc_messages = dovecot.messages(user=PC)
        no_maildirs(server)
    # What Gmail got is exactly what we stored (our Received line, then the sender's bytes); the
    # PC mailbox in Dovecot holds the same bytes below Dovecot's Return-Path and Received.
    assert hidden_copy.data.startswith(b"Received: from client.test") and hidden_copy.data.endswith(sent)
    assert below_our_received(pc_copy.data) == hidden_copy.data
    assert pc_copy.data.startswith(b"Return-Path: <alice@sender.example>\r\n")  # the original sender, no SRS
    # We add nothing: one Return-Path (Dovecot's, what our Maildir delivery writes too), and
    # Dovecot's Delivered-To names the mailbox.
    assert pc_copy.data.count(b"Return-Path:") == 1
    assert f"Delivered-To: {PC}\r\n".encode() in pc_copy.data
    assert HIDDEN.encode() not in pc_copy.data
    delivered = [e for e in events if e[0] == "delivered" and e[1] == PC]
    saved = r"250 2\.0\.0 <ituki@pc\.example\.net> \S+ Saved"
    assert delivered and re.fullmatch(saved, reply(delivered[0][2])), delivered

    assert below_our_received(detoured.data).endswith(refused) and b"X-Refuse: yes" in detoured.data
    # The copy detoured from the hidden address: the detour mailbox is its only recipient, so
    # Dovecot's Delivered-To and Received name that mailbox, never the hidden address.
    assert f"Delivered-To: {GM}\r\n".encode() in detoured.data and f"for <{GM}>".encode() in detoured.data
    assert HIDDEN.encode() not in detoured.data
    assert [e[0] for e in detour_events if e[1] in (HIDDEN, GM)] == ["refused", "detoured", "delivered"]
    assert len(pc_messages) == 2  # and the PC copy of the second message
    assert "delivered" in trace and GM in trace
    assert check.returncode == 0, check.stderr
    assert f"(mailbox by LMTP to {unix(dovecot)})" in check.stdout


def test_one_transaction_gives_each_recipient_its_own_reply(tmp_path: Path) -> None:
    extra = (f'\n[mailbox."{UNKNOWN}"]\n\n[mailbox."{FULL}"]\n\n'
             f'[forward."{TEAM}"]\nto = ["{PC}", "{UNKNOWN}", "{FULL}"]\n')
    with running_dovecot(user=PC, more_users=[GM, FULL], quotas={FULL: "1k"}, lmtp=True) as dovecot, \
            running_sink() as senders, running_sink() as gmail:
        tcp = f"{dovecot.host}:{dovecot.lmtp_port}"
        with running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}", extra=extra,
                            sender_sink=f"{senders.host}:{senders.port}", **lmtp_extra(tcp)) as server:
            big = message("to the team", body=b"x" * 4000 + b"\r\n")
            queue_id = server.send(big, to=(TEAM,))
            [stored] = wait_messages(dovecot, PC, 1)
            events = server.wait_event(queue_id, "bounced", target=FULL)
            server.wait_event(queue_id, "bounced", target=UNKNOWN)
            dsns = senders.wait_for(1)
            second = server.send(message("and once more"), to=(PC,))
            server.wait_event(second, "delivered", target=PC)
            log = dovecot.log()
            no_maildirs(server)
    assert below_our_received(stored.data).endswith(big)
    outcome = {e[1]: reply(e[2]) for e in events if e[0] in ("delivered", "refused")}
    assert outcome[PC].startswith("250 2.0.0 <ituki@pc.example.net>")
    assert outcome[UNKNOWN].startswith("550 5.1.1 <nobody@pc.example.net> User doesn't exist")
    assert outcome[FULL].startswith("552 5.2.2 <full@pc.example.net> Quota exceeded")
    assert ("alert", UNKNOWN) in [(e[0], e[1]) for e in events]  # our mailbox unknown to the store
    # One LMTP session took all three (Dovecot logs its session id on each delivery), and the
    # second message came over the same connection.
    sessions = dict(re.findall(r"lmtp\(([^)]+)\)<\d+><([^:>]+)", log))
    assert sessions.get(PC) and sessions.get(PC) == sessions.get(FULL), log[-2000:]
    assert log.count("lmtp(") and len(re.findall(r"lmtp\(\d+\): Info: Connect from", log)) == 1, log[-2000:]
    # The private DSN names the public address only.
    assert all(UNKNOWN.encode() not in d.data and FULL.encode() not in d.data for d in dsns)
    assert any(TEAM.encode() in d.data for d in dsns)


def test_over_quota_at_the_last_step_of_a_hidden_chain_is_quarantined(tmp_path: Path) -> None:
    with running_dovecot(user=PC, more_users=[GM], quotas={GM: "1k"}, lmtp=True) as dovecot, \
            running_sink() as senders, running_sink(refuse=refuse_marked) as gmail, \
            running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}",
                           sender_sink=f"{senders.host}:{senders.port}", **lmtp_extra(unix(dovecot))) as server:
        big = message("too big for the detour box", extra_headers="X-Refuse: yes\r\n", body=b"x" * 4000 + b"\r\n")
        queue_id = server.send(big)
        events = server.wait_event(queue_id, "quarantined", target=GM)
        [pc_copy] = wait_messages(dovecot, PC, 1)
        time.sleep(0.5)  # a DSN would be on its way by now
        assert senders.messages == []  # hidden: never a bounce
        assert dovecot.messages(user=GM) == []
    refused = [e for e in events if e[0] == "refused" and e[1] == GM]
    assert refused and reply(refused[0][2]).startswith("552 5.2.2 <ituki@gm.example.net> Quota exceeded")
    assert below_our_received(pc_copy.data).endswith(big)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for a Unix socket path known before Dovecot starts."""
    path = Path(tempfile.mkdtemp(prefix="md-lmtp-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_dovecot_down_is_temporary_and_retried_until_it_is_back(tmp_path: Path, socket_dir: Path) -> None:
    socket = socket_dir / "lmtp"
    with running_server(tmp_path / "md", **lmtp_extra(f"unix:{socket}")) as server:
        queue_id = server.send(message("while the store is down"), to=(PC,))
        deadline = time.monotonic() + 15
        while len([e for e in server.events(queue_id) if e[0] == "deferred"]) < 2:
            assert time.monotonic() < deadline, server.events(queue_id)
            time.sleep(0.05)
        with running_dovecot(user=PC, lmtp=True, lmtp_socket=socket) as dovecot:
            events = server.wait_event(queue_id, "delivered", target=PC, timeout=20)
            time.sleep(0.5)
            stored = dovecot.messages(user=PC)
        no_maildirs(server)
    deferred = [e for e in events if e[0] == "deferred"]
    assert all(e[1] == PC and f"lmtp:{socket}" in e[2] for e in deferred), deferred
    assert [e[0] for e in events].count("delivered") == 1 and "refused" not in [e[0] for e in events]
    assert len(stored) == 1 and b"Subject: while the store is down" in stored[0].data
