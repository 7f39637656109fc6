"""Issue 8: the detour chain reaches the hidden account again, by IMAP APPEND, end to end.

The real `maildetour serve` with the seed config, its hidden destination's detour made a chain
`["imap:gmail", "ituki@gm.example.net"]`; a real Dovecot over TLS (test CA) plays Gmail's IMAP
side, a capture sink plays Gmail's SMTP side (refusing what it is told to refuse):
- a refused copy is APPENDed, and read back over IMAP: exactly the stored bytes below our
  Received line, nothing naming the hidden address, the password from `password_command`;
- `NO` on APPEND (a full mailbox) hands the copy to the local box at once;
- IMAP down: the step is retried until `detour_after`, then the local box; IMAP coming back
  later does not bring a second copy;
- `maildetour imap test` says in one line what works and what does not.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.harness import message, running_server
from tests.peers.dovecot import DovecotPeer, running_dovecot
from tests.peers.ports import free_port
from tests.peers.sinks import running_sink

HIDDEN = "ituki-ex@gmail.com"
DETOUR = "ituki@gm.example.net"
PC = "ituki@pc.example.net"
VIRUS = "552 5.7.0 This message was blocked because its content presents a potential security issue."


def refuse_marked(data: bytes) -> str | None:
    return VIRUS if b"X-Refuse: yes" in data else None


def imap_config(dovecot: DovecotPeer, tmp_path: Path, *, port: int | None = None) -> str:
    """The [imap."gmail"] table (password by command, TLS verified with the test CA), and the
    hidden destination's detour made a chain: IMAP first, then the local box."""
    secret = tmp_path / "gmail-app-password"
    secret.write_text(dovecot.password + "\n")
    secret.chmod(0o600)
    return (f'\n[imap."gmail"]\nhost = "{dovecot.host}"\nport = {port or dovecot.imaps_port}\n'
            f'user = "{dovecot.user}"\npassword_command = "cat {secret}"\nca_file = "{dovecot.ca_file}"\n'
            'timeout = "3s"\n')


CHAIN = '["imap:gmail", "ituki@gm.example.net"]'


def test_a_refused_copy_is_appended_into_the_hidden_account_byte_for_byte(tmp_path: Path) -> None:
    with running_dovecot() as dovecot, running_sink(refuse=refuse_marked) as gmail:
        with running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}",
                            extra=imap_config(dovecot, tmp_path), detour=CHAIN) as server:
            sent = message("refused by gmail", extra_headers="X-Refuse: yes\r\n")
            queue_id = server.send(sent)
            events = server.wait_event(queue_id, "delivered", target="imap:gmail")
            [pc_copy] = server.wait_mailbox(PC, 1)
            [stored] = dovecot.messages()
            trace = server.cli("trace", queue_id).stdout
        assert server.mailbox(DETOUR) == []  # the IMAP step took it: the local box stays empty
    # Our Received line on top, then exactly what the sender sent.
    assert stored.data.startswith(b"Received: from client.test")
    assert stored.data.endswith(sent) and stored.data.count(b"\r\nReceived: ") == 0
    assert HIDDEN.encode() not in stored.data and b"ituki-ex" not in stored.data
    assert "Seen" not in stored.flags
    assert [e[0] for e in events if e[1] in (HIDDEN, "imap:gmail")] == ["refused", "detoured", "delivered"]
    assert "detoured    imap:gmail  from ituki-ex@gmail.com: refused: 552 5.7.0" in trace
    assert HIDDEN.encode() not in pc_copy


def test_no_on_append_hands_the_copy_to_the_local_box(tmp_path: Path) -> None:
    with running_dovecot(quota="1k") as dovecot, running_sink(refuse=refuse_marked) as gmail:
        with running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}",
                            extra=imap_config(dovecot, tmp_path), detour=CHAIN) as server:
            big = message("too big for the quota", extra_headers="X-Refuse: yes\r\n", body=b"x" * 4000 + b"\r\n")
            queue_id = server.send(big)
            [detoured] = server.wait_mailbox(DETOUR, 1)
            events = server.events(queue_id)
        assert dovecot.messages() == []
    assert b"Subject: too big for the quota" in detoured
    refused = [e for e in events if e[0] == "refused" and e[1] == "imap:gmail"]
    assert refused and "OVERQUOTA" in refused[0][2]
    assert ("detoured", DETOUR) in [(e[0], e[1]) for e in events]


def test_imap_down_is_retried_until_detour_after_then_the_local_box_and_no_second_copy(tmp_path: Path) -> None:
    down = free_port()  # nothing listens here while "Gmail's IMAP" is down
    with running_sink(refuse=refuse_marked) as gmail, running_dovecot() as dovecot:
        extra = imap_config(dovecot, tmp_path, port=down)
        with running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}", extra=extra,
                            detour_after="2s", delivery_extra='retry_first = "300ms"', detour=CHAIN) as server:
            queue_id = server.send(message("imap is down", extra_headers="X-Refuse: yes\r\n"))
            [detoured] = server.wait_mailbox(DETOUR, 1, timeout=20)
            events = server.wait_event(queue_id, "delivered", target=DETOUR)  # the file comes first
            time.sleep(1.0)  # had the IMAP step been kept alive, it would try again now
            later = server.events(queue_id)
    deferred = [e for e in events if e[0] == "deferred" and e[1] == "imap:gmail"]
    assert len(deferred) >= 2 and all("connection refused" in e[2] for e in deferred)
    moved = [e for e in events if e[0] == "detoured" and e[1] == DETOUR]
    assert len(moved) == 1 and "deferred: " in moved[0][2] and "connection refused" in moved[0][2]
    assert b"Subject: imap is down" in detoured
    assert later == events  # delivered at the last step: the IMAP step is not tried again


def test_imap_test_says_what_works_and_what_does_not(tmp_path: Path) -> None:
    with running_dovecot() as dovecot, \
            running_server(tmp_path / "md", extra=imap_config(dovecot, tmp_path), detour=CHAIN) as server:
        good = server.cli("imap", "test", "gmail")
        (tmp_path / "gmail-app-password").write_text("Nope-7f3a\n")
        bad = server.cli("imap", "test", "gmail")
        unknown = server.cli("imap", "test", "nosuch")
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("imap:gmail: ") and "logged in" in good.stdout and "INBOX" in good.stdout
    assert bad.returncode == 1 and "login refused" in bad.stderr and "Nope-7f3a" not in bad.stderr
    assert unknown.returncode == 1 and "nosuch" in unknown.stderr
