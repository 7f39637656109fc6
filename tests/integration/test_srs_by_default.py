"""Issue 8: the seed config, with no [signing], keeps the hidden address secret after acceptance.

Over real sockets with the real `maildetour serve`: every copy that leaves by SMTP carries an
SRS sender made from a secret the first start wrote into state_dir (postsrsd, with that very
file, decodes it); a DSN the stand-in gmail sends after accepting the hidden copy comes back to
us, is never forwarded, and sends the copy down its detour; the hidden copy travels in its own
SMTP transaction; `check` says SRS is on.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

from tests.harness import late_dsn, message, running_server
from tests.peers.postsrsd import running_postsrsd
from tests.peers.sinks import running_sink

HIDDEN = "ituki-ex@gmail.com"
DETOUR = "ituki@gm.example.net"
PC = "ituki@pc.example.net"
SENDER = "alice@sender.example"


def test_the_first_start_makes_an_srs_secret_that_postsrsd_reads_and_later_starts_keep(tmp_path: Path) -> None:
    with running_sink() as gmail, running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}") as server:
        secret_file = server.state / "srs.secret"
        made = secret_file.read_bytes()
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        assert len(made.splitlines()) == 1 and len(made.strip()) >= 24
        server.send(message("srs by default"))
        [copy] = gmail.wait_for(1)
        server.stop()
        server.start()  # a restart keeps the secret: addresses made before still verify
        assert secret_file.read_bytes() == made
    assert copy.mail_from.startswith("SRS0=") and copy.mail_from.endswith("@example.com")
    with running_postsrsd(tmp_path / "postsrsd", "example.com", secret_file) as postsrsd:
        assert postsrsd.reverse(copy.mail_from) == (200, SENDER)


def test_check_says_srs_is_on_and_where(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        result = server.cli("check")
    assert result.returncode == 0, result.stderr
    assert "srs: on, every copy that leaves by SMTP has an SRS sender at example.com" in result.stdout


def test_a_dsn_sent_after_gmail_accepted_detours_the_copy_and_reaches_no_sender(tmp_path: Path) -> None:
    with running_sink() as gmail, running_sink() as sender_domain:
        with running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}",
                            sender_sink=f"{sender_domain.host}:{sender_domain.port}") as server:
            queue_id = server.send(message("accepted, then refused by gmail"))
            [copy] = gmail.wait_for(1)
            server.wait_event(queue_id, "delivered", target=HIDDEN)
            # Gmail accepted, then bounces to the envelope sender: our SRS address, not alice.
            dsn = late_dsn(to=copy.mail_from, reporter="gmail.com", final_recipient=HIDDEN,
                           returned=copy.data, marker="late-marker-default")
            dsn_id = server.send(dsn, sender="", to=(copy.mail_from,))
            [detoured] = server.wait_mailbox(DETOUR, 1)
            assert b"Subject: accepted, then refused by gmail" in detoured
            assert any(e[0] == "late-bounce" and e[1] == HIDDEN for e in server.events(dsn_id))
            server.wait_event(queue_id, "detoured", target=DETOUR)
            time.sleep(0.5)  # a forwarded report or a DSN to alice would have gone out by now
            assert sender_domain.messages == [] and sender_domain.attempts == 0
            assert len(gmail.messages) == 1  # the report was not sent on to the hidden box either
            for box in (PC, DETOUR):
                assert all(HIDDEN.encode() not in m and b"late-marker-default" not in m for m in server.mailbox(box))


def test_the_hidden_copy_travels_alone_beside_another_address_at_the_same_host(tmp_path: Path) -> None:
    both = '\n[forward."both@example.com"]\nto = ["ituki-ex@gmail.com", "pal@gmail.com"]\n'
    with running_sink() as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", extra=both) as server:
        server.send(message("to both", to="both@example.com"), to=("both@example.com",))
        received = gmail.wait_for(2)
    assert sorted(m.rcpt_tos for m in received) == [(HIDDEN,), ("pal@gmail.com",)]
    assert all(m.mail_from.startswith("SRS0=") for m in received)
    pal = next(m for m in received if m.rcpt_tos == ("pal@gmail.com",))
    assert HIDDEN.encode() not in pal.data and b"ituki-ex" not in pal.data


def test_a_report_naming_a_mailbox_copy_or_a_stranger_answers_nothing_and_is_not_kept_forever(
        tmp_path: Path) -> None:
    """Issue 10 #4: a DSN naming our local mailbox copy made us tell the sender "could not be
    delivered" (and naming a non-target did not): an oracle for forward targets. Only copies
    that left by SMTP can match. Issue 10 #5: such reports were kept forever."""
    import sqlite3

    with running_sink() as gmail, running_sink() as sender_domain:
        with running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}",
                            sender_sink=f"{sender_domain.host}:{sender_domain.port}") as server:
            queue_id = server.send(message("probe me"))
            [copy] = gmail.wait_for(1)
            server.wait_event(queue_id, "delivered", target=PC)
            server.wait_event(queue_id, "delivered", target=HIDDEN)
            before = server.events(queue_id)
            reports = []
            for named in (PC, "nobody@elsewhere.example"):
                dsn = late_dsn(to=copy.mail_from, reporter="pc.example.net", final_recipient=named,
                               returned=copy.data, marker=f"probe-{named}")
                reports.append(server.send(dsn, sender="", to=(copy.mail_from,)))
            for dsn_id in reports:
                server.wait_event(dsn_id, "quarantined")
            time.sleep(0.5)  # a DSN to alice would have gone out by now
            assert sender_domain.messages == [] and sender_domain.attempts == 0
            assert server.events(queue_id) == before
            conn = sqlite3.connect(f"file:{server.state / 'queue.sqlite3'}?mode=ro", uri=True)
            try:
                kept = conn.execute("SELECT finished, keep_until FROM messages WHERE queue_id IN (?, ?)",
                                    reports).fetchall()
            finally:
                conn.close()
    assert len(kept) == 2 and all(finished == 1 and until is not None for finished, until in kept)
