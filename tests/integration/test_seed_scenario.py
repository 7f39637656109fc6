"""The seed scenario end to end, over real sockets, with a real Postfix playing Gmail's MX.

swaks and smtplib send; Postfix (127.0.0.2) accepts for gmail.com and refuses the EICAR test
string; a capture sink plays the sender's own domain, so any bounce would be seen.
"""

import subprocess
from pathlib import Path

import pytest

from tests.harness import EICAR, message, running_server
from tests.peers import need
from tests.peers.postfix import running_postfix
from tests.peers.sinks import running_sink

HIDDEN = "ituki-ex@gmail.com"
PC = "ituki@pc.example.net"
DETOUR = "ituki@gm.example.net"


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    with running_postfix(tmp_path / "gmail") as gmail, running_sink() as sender_domain:
        with running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}",
                            sender_sink=f"{sender_domain.host}:{sender_domain.port}") as server:
            yield server, gmail, sender_domain


def assert_no_leak(*blobs: bytes) -> None:
    for blob in blobs:
        assert HIDDEN.encode() not in blob.lower(), blob[:2000]
        assert b"ituki-ex" not in blob.lower()


def test_normal_mail_reaches_the_pc_mailbox_and_the_gmail_mx(world) -> None:  # type: ignore[no-untyped-def]
    server, gmail, sender_domain = world
    swaks = need("swaks")
    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{server.smtp_port}", "--from", "alice@sender.example",
         "--to", "ituki@example.com", "--header", "Subject: normal mail", "--body", "hello there"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 OK: queued as" in result.stdout
    assert_no_leak(result.stdout.encode())
    [pc_copy] = server.wait_mailbox(PC, 1)
    [gmail_copy] = gmail.wait_messages(HIDDEN, 1)
    assert b"Subject: normal mail" in pc_copy and b"Subject: normal mail" in gmail_copy
    assert b"by mx.example.com (maildetour)" in gmail_copy
    assert_no_leak(pc_copy)
    assert server.mailbox(DETOUR) == []
    assert sender_domain.messages == []


def test_mail_gmail_refuses_is_detoured_and_the_sender_hears_nothing(world) -> None:  # type: ignore[no-untyped-def]
    server, gmail, sender_domain = world
    queue_id = server.send(message("eicar test", body=EICAR + b"\r\n"))
    [pc_copy] = server.wait_mailbox(PC, 1)
    [detoured] = server.wait_mailbox(DETOUR, 1)
    assert EICAR in pc_copy and EICAR in detoured
    events = server.wait_event(queue_id, "detoured")
    kinds = [e[0] for e in events]
    assert "refused" in kinds and "detoured" in kinds and "bounced" not in kinds
    refused = next(e for e in events if e[0] == "refused")
    assert "550 5.7.0" in refused[2]  # Postfix's body_checks REJECT, really sent by Postfix
    assert gmail.messages(HIDDEN) == []
    assert_no_leak(pc_copy, detoured)
    # No DSN, no delay notice, nothing at all goes back to the sender's domain.
    server.wait_event(queue_id, "delivered")
    assert sender_domain.messages == []
    trace = server.cli("trace", queue_id)
    assert trace.returncode == 0 and "detoured" in trace.stdout and DETOUR in trace.stdout


def test_an_unknown_gmail_user_is_detoured_with_an_operator_alert(tmp_path: Path) -> None:
    with running_postfix(tmp_path / "gmail", users=("someone-else@gmail.com",)) as gmail, \
            running_sink() as sender_domain, \
            running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}",
                           sender_sink=f"{sender_domain.host}:{sender_domain.port}") as server:
        queue_id = server.send(message("to a gone account"))
        server.wait_mailbox(DETOUR, 1)
        events = server.wait_event(queue_id, "detoured")
        refused = next(e for e in events if e[0] == "refused")
        alert = next(e for e in events if e[0] == "alert")
        assert "5.1.1" in refused[2] and alert[1] == "ituki-ex@gmail.com" and "5.1.1" in alert[2]
        assert sender_domain.messages == []


def test_an_unreachable_gmail_detours_at_once(tmp_path: Path) -> None:
    # Nothing listens on 127.0.0.2:9: connection refused is "unreachable", not a 10-minute wait.
    with running_server(tmp_path / "md", gmail="127.0.0.2:9") as server:
        queue_id = server.send(message("gmail is down"))
        server.wait_mailbox(DETOUR, 1)
        assert "detoured" in [e[0] for e in server.events(queue_id)]


def test_a_detoured_message_can_be_fetched_over_pop3_as_gmail_would(tmp_path: Path) -> None:
    import poplib

    with running_postfix(tmp_path / "gmail") as gmail, \
            running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}", pop3=True) as server:
        server.send(message("refused then fetched", body=EICAR + b"\r\n"))
        server.wait_mailbox(DETOUR, 1)
        assert server.pop3_port is not None
        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=15)
        client.user(DETOUR)
        client.pass_("change-me-too")
        count, _size = client.stat()
        assert count == 1
        _resp, lines, _octets = client.retr(1)
        fetched = b"\r\n".join(lines)
        assert b"Subject: refused then fetched" in fetched and EICAR in fetched
        assert_no_leak(fetched)
        client.quit()


def test_the_server_log_has_one_line_per_delivery_attempt(tmp_path: Path) -> None:
    """Issue 11: like Postfix's status= lines: queue id, copy, to, relay, delays, dsn, status, reply."""
    with running_sink(refuse=lambda data: "552 5.7.0 virus" if b"EICAR" in data else None) as gmail, \
            running_server(tmp_path / "md", gmail=f"{gmail.host}:{gmail.port}") as server:
        queue_id = server.send(message("log me", body=b"EICAR\r\n"))
        server.wait_mailbox(DETOUR, 1)
        server.wait_event(queue_id, "delivered", target="ituki@pc.example.net")
        lines = [line for line in server.log().splitlines() if f"{queue_id}: " in line]
    detoured = next(line for line in lines if ": detoured " in line)
    assert f"to=ituki-ex@gmail.com" in detoured and f"relay=[{gmail.host}]:{gmail.port}" in detoured
    assert "dsn=5.7.0" in detoured and "next=ituki@gm.example.net" in detoured and 'reply="552 5.7.0 virus"' in detoured
    times = dict(pair.split("=") for pair in detoured.split() if pair.split("=")[0].endswith("_time"))
    assert float(times["connect_time"]) >= 0 and float(times["transfer_time"]) >= 0
    assert abs(float(times["connect_time"]) + float(times["transfer_time"]) - float(times["attempt_time"])) < 0.0015
    assert any(": sent " in line and "to=ituki@gm.example.net" in line and "relay=local" in line for line in lines)
    accepted = next(line for line in lines if ": accepted " in line)  # one line per accepted message
    assert "from=<alice@sender.example>" in accepted and "nrcpt=1" in accepted
    assert 'client="client.test [127.0.0.1]"' in accepted and " size=" in accepted
