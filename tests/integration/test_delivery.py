"""Delivery: retries, detours after `detour_after`, private DSNs, MX lookups, crash safety."""

import os
import signal
import threading
import time
from pathlib import Path

from tests.configs import seed
from tests.harness import message, running_server
from tests.peers.dnsmasq import DnsRecords, running_dnsmasq
from tests.peers.ports import free_port
from tests.peers.sinks import running_sink

DETOUR = "ituki@gm.example.net"
PC = "ituki@pc.example.net"

ORDINARY = """
[forward."team@example.com"]
to = ["friend@example.org"]
"""


def test_4xx_shorter_than_detour_after_is_delivered_after_retry(tmp_path: Path) -> None:
    with running_sink(temp_failures=2, temp_reply="421 4.7.0 Try again later, closing connection.") as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", detour_after="60s",
                           delivery_extra='retry_first = "300ms"') as server:
        queue_id = server.send(message("retry me"))
        [received] = gmail.wait_for(1, timeout=20)
        assert b"Subject: retry me" in received.data
        events = server.wait_event(queue_id, "delivered", target="ituki-ex@gmail.com")
        assert [e[0] for e in events if e[1] == "ituki-ex@gmail.com"] == ["deferred", "deferred", "delivered"]
        assert server.mailbox(DETOUR) == []


def test_4xx_longer_than_detour_after_is_detoured(tmp_path: Path) -> None:
    with running_sink(temp_failures=10_000, temp_reply="450 4.2.1 The user you are trying to contact is "
                                                      "receiving mail too quickly.") as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", detour_after="1500ms",
                           delivery_extra='retry_first = "300ms"') as server:
        queue_id = server.send(message("rate limited"))
        [detoured] = server.wait_mailbox(DETOUR, 1, timeout=20)
        assert b"Subject: rate limited" in detoured
        events = server.events(queue_id)
        assert sum(1 for e in events if e[0] == "deferred") >= 2
        assert any("4.2.1" in e[2] for e in events if e[0] == "deferred")
        # 4.2.1 says "slow down": the whole destination waits, longer each time (no storm).
        assert any(e[0] == "detoured" and "slow down" in e[2] for e in events)
        assert gmail.messages == [] and gmail.data_attempts <= 4


def test_an_ordinary_forward_refused_for_good_bounces_naming_only_the_public_address(tmp_path: Path) -> None:
    refuse = "550 5.1.1 <friend@example.org>: Recipient address rejected: friend does not exist"
    with running_sink(rcpt=lambda a: refuse) as friend_host, running_sink() as sender_domain:
        relay = f'"gmail.com" = "127.0.0.2:9", "example.org" = "{friend_host.host}:{friend_host.port}",' \
                f' "sender.example" = "{sender_domain.host}:{sender_domain.port}"'
        text = _seed_with(relay, ORDINARY)
        with running_server(tmp_path, text) as server:
            queue_id = server.send(message("for the team", to="team@example.com"), to=("team@example.com",))
            [dsn] = sender_domain.wait_for(1, timeout=20)
            assert dsn.mail_from == "" and dsn.rcpt_tos == ("alice@sender.example",)
            assert b"Final-Recipient: rfc822; team@example.com" in dsn.data
            assert b"Status: 5.1.1" in dsn.data
            assert b"friend" not in dsn.data.lower() and b"example.org" not in dsn.data.lower()
            events = server.wait_event(queue_id, "dsn-sent")
            # 5.1.1: the forward points at a mailbox that does not exist, an alert for the operator.
            assert [e[0] for e in events][-4:] == ["refused", "alert", "bounced", "dsn-sent"]


def test_mail_from_the_null_sender_that_fails_is_not_bounced(tmp_path: Path) -> None:
    with running_sink(rcpt=lambda a: "550 5.1.1 no such user") as friend_host, running_sink() as sender_domain:
        relay = f'"example.org" = "{friend_host.host}:{friend_host.port}",' \
                f' "sender.example" = "{sender_domain.host}:{sender_domain.port}"'
        with running_server(tmp_path, _seed_with(relay, ORDINARY)) as server:
            queue_id = server.send(message("a bounce"), sender="", to=("team@example.com",))
            events = server.wait_event(queue_id, "failed")
            assert "bounced" not in [e[0] for e in events]
            time.sleep(0.3)
            assert sender_domain.messages == []


def test_next_hop_by_mx_lookup_through_a_loopback_dns_server(tmp_path: Path) -> None:
    with running_sink(host="127.0.0.3") as mx:
        records = DnsRecords(zones=("example.org",), mx=(("example.org", "mx1.example.org", 10),),
                             a=(("mx1.example.org", "127.0.0.3"),))
        with running_dnsmasq(tmp_path / "dns", records) as dns:
            delivery = f'dns_servers = ["{dns.host}:{dns.port}"]\nsmtp_port = {mx.port}'
            text = _seed_with('"gmail.com" = "127.0.0.2:9"', ORDINARY, delivery)
            with running_server(tmp_path / "md", text) as server:
                server.send(message("via mx", to="team@example.com"), to=("team@example.com",))
                [received] = mx.wait_for(1, timeout=20)
                assert received.rcpt_tos == ("friend@example.org",)
                assert b"Subject: via mx" in received.data


def test_kill_9_during_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    """500 messages from 4 clients; the server is killed with SIGKILL midway and restarted.
    Every message that got a 250 must reach both the PC mailbox and the gmail sink."""
    with running_sink() as gmail, running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}") as server:
        acked: list[str] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            for i in range(125):
                subject = f"crash-{n}-{i}"
                try:
                    server.send(message(subject))
                except Exception:
                    continue  # refused or cut off: not acknowledged, so not promised
                with lock:
                    acked.append(subject)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 150:
            time.sleep(0.005)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        for t in threads:
            t.join()
        server.start()  # restart on the same state directory
        assert 150 <= len(acked) < 500 or len(acked) == 500
        server.send(message("after restart"))
        want = set(acked) | {"after restart"}

        def subjects(blobs: list[bytes]) -> set[str]:
            found = set()
            for blob in blobs:
                for line in blob.split(b"\r\n"):
                    if line.startswith(b"Subject: "):
                        found.add(line[9:].decode())
                        break
            return found

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if want <= subjects(server.mailbox(PC)) and want <= subjects([m.data for m in gmail.messages]):
                break
            time.sleep(0.2)
        missing_pc = want - subjects(server.mailbox(PC))
        missing_gmail = want - subjects([m.data for m in gmail.messages])
        assert not missing_pc and not missing_gmail, (len(acked), sorted(missing_pc)[:5], sorted(missing_gmail)[:5])


def _seed_with(relay: str, extra: str, delivery_extra: str = "") -> str:
    """The seed config plus `extra`, for `running_server` (which fills in {smtp_port})."""
    text = seed(smtp="127.0.0.1:SMTP_PORT", pop3=None, relay=relay, extra=extra,
                delivery_extra=f'retry_first = "300ms"\n{delivery_extra}')
    return text.replace("{", "{{").replace("}", "}}").replace("SMTP_PORT", "{smtp_port}")


def test_queue_flush_retries_deferred_copies_now(tmp_path: Path) -> None:
    with running_sink(temp_failures=1) as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", detour_after="2h",
                           delivery_extra='retry_first = "1h"') as server:
        queue_id = server.send(message("flush me"))
        server.wait_event(queue_id, "deferred", target="ituki-ex@gmail.com")
        assert "queued" in server.cli("queue").stdout
        flushed = server.cli("queue", "--flush")
        assert flushed.returncode == 0 and "asked the server" in flushed.stdout
        [received] = gmail.wait_for(1, timeout=15)  # not an hour later
        assert b"Subject: flush me" in received.data
        server.wait_event(queue_id, "delivered", target="ituki-ex@gmail.com")


def test_queue_flush_without_a_running_server_makes_copies_due_at_the_next_start(tmp_path: Path) -> None:
    with running_sink(temp_failures=1) as gmail:
        with running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", detour_after="2h",
                            delivery_extra='retry_first = "1h"') as server:
            queue_id = server.send(message("flush later"))
            server.wait_event(queue_id, "deferred", target="ituki-ex@gmail.com")
            server.wait_event(queue_id, "delivered", target="ituki@pc.example.net")  # only gmail's waits
        assert not (server.state / "maildetour.pid").exists()
        flushed = server.cli("queue", "--flush")
        assert flushed.returncode == 0 and "1 queued copies are due at the next start" in flushed.stdout
        server.start()
        try:
            [received] = gmail.wait_for(1, timeout=15)
            assert b"Subject: flush later" in received.data
        finally:
            server.stop()


def test_a_held_copy_waits_out_flushes_until_released_and_a_deleted_one_is_never_tried(tmp_path: Path) -> None:
    with running_sink(temp_failures=2) as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", detour_after="2h",
                           delivery_extra='retry_first = "1h"') as server:
        held_id = server.send(message("hold me"))
        gone_id = server.send(message("delete me"))
        for queue_id in (held_id, gone_id):
            server.wait_event(queue_id, "deferred", target="ituki-ex@gmail.com")
        hold = server.cli("queue", "--hold", held_id)
        assert hold.returncode == 0 and "held 1 copy of" in hold.stdout
        delete = server.cli("queue", "--delete", gone_id)
        assert delete.returncode == 0 and "deleted 1 copy of" in delete.stdout
        assert server.cli("queue", "--hold", gone_id).returncode == 1  # nothing queued is left
        listing = server.cli("queue").stdout
        assert "held" in listing and gone_id not in listing
        assert server.cli("queue", "--flush").returncode == 0
        time.sleep(1.0)  # a flushed server would try both now: neither goes
        assert gmail.data_attempts == 2 and gmail.messages == []
        released = server.cli("queue", "--release", held_id)
        assert released.returncode == 0 and "released 1 copy of" in released.stdout
        [received] = gmail.wait_for(1, timeout=15)
        assert b"Subject: hold me" in received.data
        events = server.wait_event(held_id, "delivered", target="ituki-ex@gmail.com")
        assert [e[0] for e in events if e[0] in ("held", "released")] == ["held", "released"]
        assert "deleted" in [e[0] for e in server.events(gone_id)]
    audit = (server.state / "audit.jsonl").read_text()
    assert '"event": "held"' in audit and '"event": "released"' in audit and '"event": "deleted"' in audit


def test_a_quarantined_copy_can_be_released_once_the_cause_is_fixed(tmp_path: Path) -> None:
    # The hidden destination is down and its detour target (an SMTP host) refuses: quarantine.
    port = free_port("127.0.0.3")
    text = _seed_with(f'"gmail.com" = "127.0.0.2:9", "backup.example" = "127.0.0.3:{port}"', "") \
        .replace('detour       = "ituki@gm.example.net"', 'detour       = "box@backup.example"')
    with running_server(tmp_path, text) as server:
        with running_sink(host="127.0.0.3", port=port, refuse=lambda data: "554 5.7.1 not today"):
            queue_id = server.send(message("held"))
            server.wait_event(queue_id, "quarantined", target="box@backup.example")
        assert server.cli("queue", "--release", "NOSUCH").returncode == 1
        # The operator gets the backup host fixed, then releases the message.
        with running_sink(host="127.0.0.3", port=port) as backup:
            released = server.cli("queue", "--release", queue_id)
            assert released.returncode == 0 and "released 1 copy of" in released.stdout
            [received] = backup.wait_for(1, timeout=15)
            assert b"Subject: held" in received.data
            events = server.wait_event(queue_id, "delivered", target="box@backup.example")
            assert "released" in [e[0] for e in events]


def test_hidden_is_inherited_along_a_chain_reached_from_an_ordinary_destination(tmp_path: Path) -> None:
    """Issue 10 #7: an ordinary forward target whose detour is the hidden destination; when the
    hidden one and its own detour refuse too, that is a quarantine, never a bounce naming anyone."""
    port = free_port("127.0.0.3")
    chain = """
[forward."team@example.com"]
to = ["friend@example.org"]

[destination."friend@example.org"]
detour = "ituki-ex@gmail.com"
"""
    text = _seed_with(f'"gmail.com" = "127.0.0.3:{port}", "example.org" = "127.0.0.3:{port}", '
                      f'"backup.example" = "127.0.0.3:{port}", "sender.example" = "127.0.0.3:{port}"', chain) \
        .replace('detour       = "ituki@gm.example.net"', 'detour       = "box@backup.example"')
    refuse_all = lambda address: None if address.startswith("alice@") else "550 5.7.1 no"  # noqa: E731
    with running_sink(host="127.0.0.3", port=port, rcpt=refuse_all) as everything, \
            running_server(tmp_path, text) as server:
        queue_id = server.send(message("through hidden", to="team@example.com"), to=("team@example.com",))
        events = server.wait_event(queue_id, "quarantined", target="box@backup.example")
        time.sleep(0.5)  # a DSN to alice would have gone out by now
    assert [e[1] for e in events if e[0] == "detoured"] == ["ituki-ex@gmail.com", "box@backup.example"]
    assert "bounced" not in [e[0] for e in events] and "dsn-sent" not in [e[0] for e in events]
    assert everything.messages == []  # every target refused at RCPT; alice would have been taken
