"""Issue 12, what `maildetour queue list|show` prints: the postqueue -p style blocks with each
copy's state, attempts, next attempt and last reply, the totals and the truncation line; the
JSON lines' keys; a message's envelope, headers and (on request) body."""

import json
from datetime import datetime, timezone

from maildetour import report
from maildetour.store.listing import ListedCopy, ListedMessage, QueueListing
from maildetour.store.records import Copy, Event, Message, Story

NOW = datetime(2026, 11, 18, 12, 0, tzinfo=timezone.utc).timestamp()
MESSAGE = Message("661453D5F025043BB", "alice@sender.example", NOW - 7500, "<m1@sender.example>", 2048,
                  "client.test [127.0.0.1]")
DEFERRED = Event(NOW - 3600, MESSAGE.queue_id, 4, "deferred", "ituki-ex@gmail.com",
                 "attempt 2: 451 4.3.0 try again later")


def copy(copy_id: int, target: str, state: str = "queued", **changes: object) -> Copy:
    fields: dict[str, object] = dict(
        id=copy_id, queue_id=MESSAGE.queue_id, mail_from=MESSAGE.mail_from, recipient="ituki@example.com",
        target=target, origin=target, hidden=False, state=state, attempts=2, next_at=NOW + 1800,
        first_failure=NOW - 7000, detours=0, received_at=MESSAGE.received_at, size=MESSAGE.size)
    fields.update(changes)
    return Copy(**fields)  # type: ignore[arg-type]


GMAIL = copy(4, "ituki-ex@gmail.com", hidden=True)
BACKUP = copy(5, "box@backup.example", "quarantined", attempts=1, detours=1, origin="ituki-ex@gmail.com")


def listing(*copies: ListedCopy, matched_messages: int = 1) -> QueueListing:
    return QueueListing((ListedMessage(MESSAGE, copies),), matched_messages, len(copies), MESSAGE.size)


def test_a_message_block_lists_each_copy_with_state_attempts_next_attempt_and_last_reply() -> None:
    text = report.queue_listing(listing(ListedCopy(GMAIL, DEFERRED, None), ListedCopy(BACKUP, None, None)), NOW)
    assert text.splitlines() == [
        "-Queue ID-------- --Size-- ----Arrival Time---- --Age--  -Sender/Copies-------------",
        "",
        "661453D5F025043BB     2048 2026-11-18 09:55:00Z   2h05m  <alice@sender.example>",
        "  #4 ituki-ex@gmail.com  queued, 2 attempts, next attempt 2026-11-18 12:30:00Z",
        "     for ituki@example.com",
        "     (deferred 2026-11-18 11:00:00Z: attempt 2: 451 4.3.0 try again later)",
        "  #5 box@backup.example  quarantined, 1 attempt",
        "     for ituki@example.com, after 1 detour from ituki-ex@gmail.com",
        "",
        "-- 2 Kbytes in 1 message, 2 copies.",
    ]


def test_a_copy_in_flight_says_since_when_and_the_null_sender_shows_as_angle_brackets() -> None:
    bounce = ListedMessage(Message("Q2", "", NOW - 30, "", 10, "local"),
                           (ListedCopy(copy(9, "alice@sender.example", recipient="alice@sender.example"),
                                       None, NOW - 5),))
    text = report.queue_listing(QueueListing((bounce,), 1, 1, 10), NOW)
    assert "    30s  <>" in text
    assert "  #9 alice@sender.example  queued, 2 attempts, next attempt 2026-11-18 12:30:00Z, in flight since " \
           "2026-11-18 11:59:55Z" in text
    assert "for alice@sender.example" not in text  # said once: the target is whom it is for
    assert text.endswith("-- 1 Kbytes in 1 message, 1 copy.")


def test_a_listing_cut_by_the_limit_says_so_after_the_totals_of_everything_matched() -> None:
    text = report.queue_listing(listing(ListedCopy(GMAIL, None, None), matched_messages=12_345), NOW)
    assert text.splitlines()[-2:] == ["-- 2 Kbytes in 12345 messages, 1 copy.",
                                      "... 1 of 12345 messages shown; --limit to see more"]


def test_ages_read_at_a_glance() -> None:
    assert [report.age(s) for s in (-1, 0, 59, 60, 3599, 3600, 7500, 86_399, 86_400, 97_200, 10 * 86_400)] == [
        "0s", "0s", "59s", "1m", "59m", "1h00m", "2h05m", "23h59m", "1d00h", "1d03h", "10d00h"]


def test_json_lines_carry_stable_keys_and_the_last_reply() -> None:
    [line] = report.queue_json(listing(ListedCopy(GMAIL, DEFERRED, NOW - 1), ListedCopy(BACKUP, None, None)), NOW)
    entry = json.loads(line)
    assert entry == {
        "queue_id": "661453D5F025043BB", "arrival_time": NOW - 7500, "age": 7500, "message_size": 2048,
        "sender": "alice@sender.example", "message_id": "<m1@sender.example>", "client": "client.test [127.0.0.1]",
        "copies": [
            {"copy": 4, "recipient": "ituki@example.com", "target": "ituki-ex@gmail.com",
             "origin": "ituki-ex@gmail.com", "hidden": True, "state": "queued", "attempts": 2, "detours": 0,
             "next_attempt": NOW + 1800, "in_flight_since": NOW - 1,
             "last_reply": "attempt 2: 451 4.3.0 try again later", "last_reply_kind": "deferred",
             "last_reply_time": NOW - 3600},
            {"copy": 5, "recipient": "ituki@example.com", "target": "box@backup.example",
             "origin": "ituki-ex@gmail.com", "hidden": False, "state": "quarantined", "attempts": 1, "detours": 1,
             "next_attempt": None, "in_flight_since": None,
             "last_reply": None, "last_reply_kind": None, "last_reply_time": None},
        ]}


DATA = (b"Received: from client.test\r\n\tby mx.example.com\r\nFrom: Alice <alice@sender.example>\r\n"
        b"Subject: caf\xc3\xa9 \xff\r\n\r\nThe body.\r\n\r\nSecond paragraph.\r\n")
STORY = Story(MESSAGE, (GMAIL, BACKUP), (
    Event(NOW - 7500, MESSAGE.queue_id, None, "accepted", "ituki@example.com", "from=<alice@sender.example>"),
    DEFERRED, Event(NOW - 3500, MESSAGE.queue_id, None, "held", "", "1 queued copy held by the operator")))


def test_show_gives_the_envelope_copies_and_headers_and_the_body_only_on_request() -> None:
    text = report.message_show(STORY, DATA, body=False, now=NOW)
    assert text.splitlines() == [
        "message 661453D5F025043BB  received 2026-11-18 09:55:00Z (2h05m ago)",
        "  from <alice@sender.example>  client client.test [127.0.0.1]  size 2048",
        "  Message-ID <m1@sender.example>",
        "copies:",
        "  #4 ituki-ex@gmail.com  queued, 2 attempts, next attempt 2026-11-18 12:30:00Z",
        "     for ituki@example.com",
        "     (deferred 2026-11-18 11:00:00Z: attempt 2: 451 4.3.0 try again later)",
        "  #5 box@backup.example  quarantined, 1 attempt",
        "     for ituki@example.com, after 1 detour from ituki-ex@gmail.com",
        "",
        "Received: from client.test",
        "\tby mx.example.com",
        "From: Alice <alice@sender.example>",
        "Subject: café \ufffd",  # bytes that are not UTF-8 are shown, replaced
    ]
    whole = report.message_show(STORY, DATA, body=True, now=NOW)
    assert whole.startswith(text + "\n\nThe body.\n\nSecond paragraph.")


def test_show_says_when_the_bytes_are_gone() -> None:
    text = report.message_show(STORY, None, body=True, now=NOW)
    assert text.endswith("after 1 detour from ituki-ex@gmail.com\n\n"
                         "(the message's bytes are no longer kept: its copies are final)")
