"""Issue 12, queue tools: `maildetour queue list|show|flush|hold|release|delete|requeue` against
the real server, over sockets: what the listing says (last reply, totals, JSON, filters, the
limit), that each action reaches the running server and only the copies it names, that a copy
in flight is not deleted, and that every action is in `trace`."""

import json
import re
import time
from pathlib import Path

from tests.configs import seed
from tests.harness import Server, message, running_server
from tests.peers.ports import free_port
from tests.peers.sinks import running_sink

GMAIL, PC = "ituki-ex@gmail.com", "ituki@pc.example.net"
# Nothing retries on its own during a test: only the operator's hand moves a deferred copy.
NO_RETRY = 'retry_first = "1h"'


def deferred(server: Server, *subjects: str) -> list[str]:
    """Send one message per subject; wait until each one's gmail copy was deferred."""
    ids = [server.send(message(subject)) for subject in subjects]
    for queue_id in ids:
        server.wait_event(queue_id, "deferred", target=GMAIL)
    return ids


def trace_kinds(server: Server, queue_id: str) -> str:
    traced = server.cli("trace", queue_id)
    assert traced.returncode == 0, traced.stderr
    return traced.stdout


def test_the_listing_shows_each_deferred_copy_with_its_last_reply_and_the_totals(tmp_path: Path) -> None:
    with running_sink(temp_failures=2) as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", detour_after="2h",
                           delivery_extra=NO_RETRY) as server:
        first, second = deferred(server, "first", "second")
        for queue_id in (first, second):
            server.wait_event(queue_id, "delivered", target=PC)
        listing = server.cli("queue")
        assert listing.returncode == 0, listing.stderr
        text = listing.stdout
        assert text.startswith("-Queue ID-")
        assert text.index(first) < text.index(second)  # oldest first
        assert text.count("#") == 2 and PC not in text  # the delivered pc copies are not listed
        assert "ituki-ex@gmail.com  queued, 1 attempt, next attempt " in text
        assert "for ituki@example.com" in text and "<alice@sender.example>" in text
        assert "(deferred " in text and "attempt 1: 451 4.3.0 try again later)" in text
        totals, kept = text.rstrip().splitlines()[-2:]
        assert totals.endswith("in 2 messages, 2 copies.")
        assert kept == "-- kept beyond the queue: 0 finished messages, 0 late bounces, 0 quarantined copies."
        assert server.cli("queue", "list").stdout == text  # `queue` alone is `queue list`

        everything = server.cli("queue", "list", "--all").stdout
        assert everything.index(second) < everything.index(first)  # newest first
        assert f"{PC}  delivered, 1 attempt" in everything and "in 2 messages, 4 copies." in everything

        cut = server.cli("queue", "list", "--all", "--limit", "1")
        assert cut.returncode == 0 and second in cut.stdout and first not in cut.stdout
        assert "in 2 messages, 4 copies." in cut.stdout  # the totals count what the limit left out
        assert cut.stdout.rstrip().splitlines()[-2] == "... 1 of 2 messages shown; --limit to see more"
        cut_json = server.cli("queue", "list", "--json", "--all", "--limit", "1")  # stdout stays JSON lines
        assert [json.loads(line)["queue_id"] for line in cut_json.stdout.splitlines()] == [second]
        assert cut_json.stderr == "maildetour: ... 1 of 2 messages shown; --limit to see more\n"


def test_json_lines_have_the_documented_keys_and_filters_combine(tmp_path: Path) -> None:
    with running_sink(temp_failures=1) as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", detour_after="2h",
                           delivery_extra=NO_RETRY) as server:
        [queue_id] = deferred(server, "as json")
        server.wait_event(queue_id, "delivered", target=PC)
        listed = server.cli("queue", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        [line] = listed.stdout.splitlines()
        entry = json.loads(line)
        assert list(entry) == ["queue_id", "arrival_time", "age", "message_size", "sender", "message_id", "client",
                               "copies"]
        assert (entry["queue_id"], entry["sender"], entry["message_id"]) == (
            queue_id, "alice@sender.example", "<as-json@sender.example>")
        assert entry["age"] >= 0 and entry["message_size"] > 0
        [copy] = entry["copies"]
        assert list(copy) == ["copy", "recipient", "target", "origin", "hidden", "state", "attempts", "detours",
                              "next_attempt", "in_flight_since", "last_reply", "last_reply_kind", "last_reply_time"]
        assert (copy["target"], copy["state"], copy["attempts"], copy["hidden"]) == (GMAIL, "queued", 1, True)
        assert copy["next_attempt"] > time.time() + 3000  # retry_first: an hour away
        assert copy["last_reply"] == "attempt 1: 451 4.3.0 try again later" and copy["last_reply_kind"] == "deferred"

        def copies(*args: str) -> list[tuple[str, str]]:
            found = server.cli("queue", "list", "--json", *args)
            assert found.returncode == 0, found.stderr
            return [(c["target"], c["state"]) for line in found.stdout.splitlines()
                    for c in json.loads(line)["copies"]]

        assert copies("--all") == [(PC, "delivered"), (GMAIL, "queued")]
        assert copies("--state", "delivered") == [(PC, "delivered")]
        assert copies("--all", "--dest", "gmail.com") == [(GMAIL, "queued")]
        assert copies("--all", "--dest", "ITUKI@pc.example.net") == [(PC, "delivered")]
        assert copies("--state", "queued", "--state", "delivered", "--older-than", "0s") == [
            (PC, "delivered"), (GMAIL, "queued")]
        for nothing in (["--dest", "nobody.example"], ["--older-than", "1h"], ["--state", "held"],
                        ["--state", "delivered", "--dest", "gmail.com"]):
            found = server.cli("queue", "list", *nothing)
            assert (found.returncode, found.stdout, found.stderr) == (1, "", "maildetour: no copies match\n"), nothing
        assert server.cli("queue", "list", "--state", "lost").returncode == 2  # usage
        assert server.cli("queue", "list", "--older-than", "soon").returncode == 2
        assert server.cli("queue", "--state", "held", "flush").returncode == 2  # a listing's option, elsewhere
        assert server.cli("queue", "--hold", queue_id, "hold", queue_id).returncode == 2  # old and new spelling

        def ageless(*args: str) -> list[dict[str, object]]:
            return [{k: v for k, v in json.loads(line).items() if k != "age"}
                    for line in server.cli(*args).stdout.splitlines()]

        assert ageless("queue", "--json", "--all") == ageless("queue", "list", "--json", "--all")  # the same


def test_flush_of_one_message_delivers_that_one_only(tmp_path: Path) -> None:
    with running_sink(temp_failures=2) as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", detour_after="2h",
                           delivery_extra=NO_RETRY) as server:
        first, second = deferred(server, "flush me", "leave me")
        flushed = server.cli("queue", "flush", second)
        assert flushed.returncode == 0, flushed.stderr
        assert f"flushed 1 copy of {second}: due now" in flushed.stdout and "reads the queue again" in flushed.stdout
        [received] = gmail.wait_for(1, timeout=15)
        assert b"Subject: leave me" in received.data
        server.wait_event(second, "delivered", target=GMAIL)
        time.sleep(1.0)  # the other one was not tried again
        assert len(gmail.messages) == 1 and gmail.data_attempts == 3
        assert "flushed" in trace_kinds(server, second) and "flushed" not in trace_kinds(server, first)

        nothing = server.cli("queue", "flush", second)  # delivered: nothing of it is queued
        assert (nothing.returncode, nothing.stderr) == (1, f"maildetour: no queued copies of {second}\n")
        assert server.cli("queue", "flush", "--dest", "nobody.example").returncode == 1

        by_dest = server.cli("queue", "flush", "--dest", "gmail.com")
        assert by_dest.returncode == 0 and "flushed 1 copy to gmail.com" in by_dest.stdout
        gmail.wait_for(2, timeout=15)
        server.wait_event(first, "delivered", target=GMAIL)
        assert "flushed" in trace_kinds(server, first)


def test_a_message_with_a_copy_in_flight_is_not_deleted(tmp_path: Path) -> None:
    with running_sink(delay=10.0) as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", detour_after="2h",
                           delivery_extra=NO_RETRY) as server:
        queue_id = server.send(message("slow one"))
        deadline = time.monotonic() + 10
        while gmail.data_attempts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gmail.data_attempts == 1  # the sink holds the attempt in DATA for 10 s
        time.sleep(0.3)  # (the mark is written within 0.1 s)
        refused = server.cli("queue", "delete", queue_id)
        assert refused.returncode == 1 and refused.stdout == "", refused
        assert refused.stderr.startswith(f"maildetour: {queue_id} not deleted: 1 copy (#")
        assert "in a delivery attempt now" in refused.stderr and len(refused.stderr.splitlines()) == 1
        [line] = server.cli("queue", "list", "--json").stdout.splitlines()
        [copy] = json.loads(line)["copies"]
        assert copy["target"] == GMAIL and copy["in_flight_since"] is not None
        assert gmail.messages == []  # (all of this while the attempt was in flight)

        gmail.wait_for(1, timeout=20)
        events = server.wait_event(queue_id, "delivered", target=GMAIL)
        assert "deleted" not in [e[0] for e in events]
        assert "in flight" not in server.cli("queue", "list", "--all").stdout
        after = server.cli("queue", "delete", queue_id)  # nothing left to delete now
        assert (after.returncode, after.stderr) == (1, f"maildetour: no undelivered copies of {queue_id}\n")


def test_hold_release_and_delete_reach_the_server_and_trace(tmp_path: Path) -> None:
    with running_sink(temp_failures=2) as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", detour_after="2h",
                           delivery_extra=NO_RETRY) as server:
        held_id, gone_id = deferred(server, "hold me", "delete me")
        held = server.cli("queue", "hold", held_id)
        assert held.returncode == 0 and f"held 1 copy of {held_id}" in held.stdout
        assert server.cli("queue", "hold", held_id).returncode == 1  # nothing queued is left to hold
        deleted = server.cli("queue", "delete", gone_id)
        assert deleted.returncode == 0 and f"deleted 1 copy of {gone_id}" in deleted.stdout
        listing = server.cli("queue", "list", "--state", "held").stdout
        assert held_id in listing and gone_id not in listing and "held, 0 attempts" in listing
        assert server.cli("queue", "flush").returncode == 0
        time.sleep(1.0)  # a flush tries every queued copy: neither of these is one
        assert gmail.data_attempts == 2 and gmail.messages == []

        released = server.cli("queue", "release", held_id)
        assert released.returncode == 0 and f"released 1 copy of {held_id}" in released.stdout
        [received] = gmail.wait_for(1, timeout=15)
        assert b"Subject: hold me" in received.data
        server.wait_event(held_id, "delivered", target=GMAIL)
        story = trace_kinds(server, held_id)
        assert story.index(" held ") < story.index(" released ") < story.rindex(" delivered ")
        assert " deleted " in trace_kinds(server, gone_id)
        assert server.cli("queue", "release", "NOSUCH").returncode == 1


def test_requeue_sends_a_quarantined_copy_back_to_its_first_target_and_show_shows_it(tmp_path: Path) -> None:
    # The hidden gmail is down (nothing listens) and its detour target refuses: quarantine.
    gmail_port, backup_port = free_port("127.0.0.2"), free_port("127.0.0.3")
    text = seed(smtp="127.0.0.1:SMTP_PORT", pop3=None, delivery_extra=NO_RETRY,
                relay=f'"gmail.com" = "127.0.0.2:{gmail_port}", "backup.example" = "127.0.0.3:{backup_port}"')
    text = text.replace("{", "{{").replace("}", "}}").replace("SMTP_PORT", "{smtp_port}") \
        .replace('detour       = "ituki@gm.example.net"', 'detour       = "box@backup.example"')
    with running_server(tmp_path, text) as server:
        with running_sink(host="127.0.0.3", port=backup_port, refuse=lambda data: "554 5.7.1 not today"):
            queue_id = server.send(message("requeue me", body=b"The body text.\r\n"))
            server.wait_event(queue_id, "quarantined", target="box@backup.example")

        shown = server.cli("queue", "show", queue_id)
        assert shown.returncode == 0, shown.stderr
        assert f"message {queue_id}  received " in shown.stdout and "from <alice@sender.example>" in shown.stdout
        assert "box@backup.example  quarantined, 1 attempt" in shown.stdout
        assert f"after 1 detour from {GMAIL}" in shown.stdout and "554 5.7.1 not today" in shown.stdout
        assert "\nSubject: requeue me\n" in shown.stdout and "The body text." not in shown.stdout
        whole = server.cli("queue", "show", queue_id, "--body").stdout
        assert whole == shown.stdout + "\nThe body text.\n"  # the same, then the body after an empty line
        missing = server.cli("queue", "show", "NOSUCH")
        assert (missing.returncode, missing.stderr) == (1, "maildetour: no message with queue id or Message-ID "
                                                           "'NOSUCH'\n")

        assert server.cli("queue", "requeue", "NOSUCH").returncode == 1
        with running_sink(host="127.0.0.2", port=gmail_port) as gmail:  # gmail is back
            requeued = server.cli("queue", "requeue", queue_id)
            assert requeued.returncode == 0, requeued.stderr
            assert f"requeued 1 copy of {queue_id} at their first target" in requeued.stdout
            [received] = gmail.wait_for(1, timeout=15)
            assert b"Subject: requeue me" in received.data
            events = server.wait_event(queue_id, "delivered", target=GMAIL)
        requeue_event = [e for e in events if e[0] == "requeued"]
        assert requeue_event == [("requeued", GMAIL, "quarantined at box@backup.example: queued again at its "
                                                     "first target, attempts reset, by the operator")]
        assert " requeued " in trace_kinds(server, queue_id)
        again = server.cli("queue", "requeue", queue_id)  # delivered now: nothing to requeue
        assert (again.returncode, again.stderr) == (
            1, f"maildetour: no quarantined, bounced or failed copies of {queue_id}\n")


def test_the_listing_says_what_is_kept_beyond_the_queue(tmp_path: Path) -> None:
    """Issue 12: finished messages (kept for `trace` until `[store] retention`) and quarantined
    copies (until `quarantine_retention`) are reported by `queue`, with when they go."""
    with running_server(tmp_path, extra='[forward."pc@example.com"]\nto = ["ituki@pc.example.net"]\n') as server:
        delivered = server.send(message("delivered", to="pc@example.com"), to=("pc@example.com",))
        server.wait_event(delivered, "delivered")
        looping = message("loop", to="pc@example.com",
                          extra_headers="".join(f"Received: from hop{n}.example\r\n" for n in range(60)))
        server.send(looping, to=("pc@example.com",))  # over max_received: quarantined at once
        deadline = time.monotonic() + 15
        while True:
            listed = server.cli("queue")
            kept = listed.stdout.rstrip().splitlines()[-1]
            if kept.startswith("-- kept beyond the queue: 1 finished message ") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert listed.returncode == 0, listed.stderr
    assert kept.startswith("-- kept beyond the queue: 1 finished message (oldest finished "), kept
    assert "ago; removed 30d00h after)" in kept and ", 0 late bounces, " in kept
    assert re.search(r", 1 quarantined copy \(the oldest waiting \d+s; deleted 90d00h after\)\.$", kept), kept
