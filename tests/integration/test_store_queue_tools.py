"""Issue 12, the store under the queue tools: the listing (filters, order, limit, totals, last
reply), attempt marks and the refused delete, flush of chosen copies, requeue to the origin."""

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from maildetour.store.listing import BytesGone, InFlight, QueueListing, QueueQuery
from maildetour.store.records import Event, Message, NewCopy
from maildetour.store.sqlite import IN_DATABASE, SqliteStore


async def with_store(tmp_path: Path, body):  # type: ignore[no-untyped-def]
    store = SqliteStore(tmp_path / "queue.sqlite3", tmp_path / "spool", tmp_path / "audit.jsonl")
    writer = asyncio.create_task(store.run())
    try:
        return await body(store)
    finally:
        writer.cancel()
        store.close()


def msg(queue_id: str, at: float, size: int = 1000) -> Message:
    return Message(queue_id, "a@b.example", at, f"<{queue_id}@x>", size, "c [127.0.0.1]")


def two_copies() -> list[NewCopy]:
    return [NewCopy("r@example.com", "box@pc.example.net", False), NewCopy("r@example.com", "hid@gmail.com", True)]


def test_the_listing_filters_orders_limits_and_counts_what_matched(tmp_path: Path) -> None:
    async def body(store: SqliteStore):  # type: ignore[no-untyped-def]
        made = {}
        for queue_id, at in (("QA", 100.0), ("QB", 200.0), ("QC", 300.0)):
            made[queue_id] = await store.accept(msg(queue_id, at), b"x\r\n", two_copies(), [])
        pc_a, gmail_a = made["QA"]
        await store.update(replace(pc_a, state="delivered", attempts=1), [
            Event(110.0, "QA", pc_a.id, "delivered", pc_a.target, "attempt 1: 250 ok")])
        await store.update(replace(gmail_a, attempts=2, next_at=900.0), [
            Event(120.0, "QA", gmail_a.id, "deferred", gmail_a.target, "attempt 1: 451 later"),
            Event(130.0, "QA", gmail_a.id, "deferred", gmail_a.target, "attempt 2: 452 full"),
            Event(131.0, "QA", gmail_a.id, "alert", gmail_a.target, "not a reply")])
        return (await store.listing(QueueQuery()),
                await store.listing(QueueQuery(states=None, newest_first=True, limit=2)),
                await store.listing(QueueQuery(states=None, dest="GMAIL.com", received_before=250.0)),
                await store.listing(QueueQuery(states=("delivered",), dest="box@pc.example.net")),
                await store.listing(QueueQuery(dest="nobody.example")), gmail_a.id)

    default, newest, filtered, delivered, nothing, gmail_a = asyncio.run(with_store(tmp_path, body))
    assert [m.message.queue_id for m in default.messages] == ["QA", "QB", "QC"]  # oldest first
    assert (default.matched_messages, default.matched_copies, default.matched_bytes) == (3, 5, 3000)
    first = default.messages[0]
    [gmail] = first.copies  # the delivered pc copy is not queued, held or quarantined
    assert gmail.copy.id == gmail_a and gmail.copy.attempts == 2
    assert gmail.last_reply is not None and gmail.last_reply.detail == "attempt 2: 452 full"
    assert default.messages[1].copies[0].last_reply is None and not default.truncated

    assert [m.message.queue_id for m in newest.messages] == ["QC", "QB"] and newest.truncated
    assert (newest.matched_messages, newest.matched_copies) == (3, 6)
    assert [(m.message.queue_id, [c.copy.target for c in m.copies]) for m in filtered.messages] == [
        ("QA", ["hid@gmail.com"]), ("QB", ["hid@gmail.com"])]
    [only] = delivered.messages
    assert only.message.queue_id == "QA" and only.copies[0].last_reply.kind == "delivered"  # type: ignore[union-attr]
    assert (nothing.messages, nothing.matched_messages, nothing.matched_bytes) == ((), 0, 0)


def read_only_listing(tmp_path: Path) -> QueueListing:
    """What another process (`maildetour queue list`) sees: only what committed."""
    async def read() -> QueueListing:
        store = SqliteStore(tmp_path / "queue.sqlite3", tmp_path / "spool", tmp_path / "audit.jsonl", readonly=True)
        try:
            return await store.listing(QueueQuery())
        finally:
            store.close()

    return asyncio.run(read())


def test_a_copy_marked_in_an_attempt_is_not_deleted_until_its_update(tmp_path: Path) -> None:
    async def body(store: SqliteStore):  # type: ignore[no-untyped-def]
        pc, gmail = await store.accept(msg("QM", 100.0), b"x\r\n", two_copies(), [])
        store.started([gmail.id], 150.0)
        before = await asyncio.to_thread(read_only_listing, tmp_path)  # the mark waits for a write ...
        await asyncio.sleep(0.3)
        seen = await asyncio.to_thread(read_only_listing, tmp_path)  # ... or commits on its own soon
        listed = await store.listing(QueueQuery())
        refused = await store.delete("QM", 160.0, refuse_in_flight=True)
        await store.update(replace(gmail, attempts=1, next_at=900.0), [])  # the attempt reports
        after = await store.listing(QueueQuery())
        deleted = await store.delete("QM", 170.0, refuse_in_flight=True)
        return before, seen, listed, refused, after, deleted, gmail.id, await store.story("QM")

    before, seen, listed, refused, after, deleted, gmail_id, story = asyncio.run(with_store(tmp_path, body))

    def marks(listing: QueueListing) -> dict[int, float | None]:
        return {c.copy.id: c.in_flight_since for c in listing.messages[0].copies}

    assert marks(before)[gmail_id] is None and marks(seen)[gmail_id] == 150.0 == marks(listed)[gmail_id]
    assert refused == InFlight((gmail_id,))
    assert all(c.in_flight_since is None for c in after.messages[0].copies)
    assert deleted == 2 and [e.kind for e in story.events] == ["deleted"]  # the refusal changed nothing


def test_marks_of_copies_held_meanwhile_and_of_an_earlier_run_are_cleared(tmp_path: Path) -> None:
    async def body(store: SqliteStore):  # type: ignore[no-untyped-def]
        [copy] = await store.accept(msg("QH", 100.0), b"x\r\n", [NewCopy("r@example.com", "t@ex.org", False)], [])
        await store.hold("QH", 110.0)
        store.started([copy.id], 120.0)  # held meanwhile: not in this attempt
        not_marked = await store.listing(QueueQuery(states=None))
        await store.release("QH", 130.0)
        store.started([copy.id], 140.0)
        await store.hold("QH", 150.0)  # held during the attempt: its update is refused ...
        applied = await store.update(replace(copy, attempts=1), [])
        held = await store.listing(QueueQuery())
        await store.release("QH", 160.0)
        store.started([copy.id], 170.0)  # ... and a server dies during the next one
        dying = await store.listing(QueueQuery())
        return not_marked, applied, held, dying

    not_marked, applied, held, dying = asyncio.run(with_store(tmp_path, body))
    assert dying.messages[0].copies[0].in_flight_since == 170.0
    assert not_marked.messages[0].copies[0].in_flight_since is None and applied is False
    assert held.messages[0].copies[0].in_flight_since is None  # ... but the attempt is over
    restarted = SqliteStore(tmp_path / "queue.sqlite3", tmp_path / "spool", tmp_path / "audit.jsonl")
    try:
        restarted.recover()  # what the server does at start

        async def refuse() -> object:
            async with restarted.running():
                return await restarted.delete("QH", 200.0, refuse_in_flight=True)

        assert asyncio.run(refuse()) == 1
    finally:
        restarted.close()


def test_flush_makes_only_the_chosen_queued_copies_due_with_a_flushed_event_each(tmp_path: Path) -> None:
    async def body(store: SqliteStore):  # type: ignore[no-untyped-def]
        for queue_id in ("QF", "QG"):
            for copy in await store.accept(msg(queue_id, 100.0), b"x\r\n", two_copies(), []):
                await store.update(replace(copy, attempts=1, next_at=5000.0), [])
        by_id = await store.flush(200.0, queue_id="QF")
        by_dest = await store.flush(300.0, dest="@gmail.com")
        nothing = await store.flush(400.0, queue_id="QF", dest="nobody.example")
        due = sorted((c.queue_id, c.target, c.next_at) for c in await store.unfinished())
        return by_id, by_dest, nothing, due

    by_id, by_dest, nothing, due = asyncio.run(with_store(tmp_path, body))
    assert (by_id, by_dest, nothing) == (2, 2, 0)
    assert due == [("QF", "box@pc.example.net", 200.0), ("QF", "hid@gmail.com", 300.0),
                   ("QG", "box@pc.example.net", 5000.0), ("QG", "hid@gmail.com", 300.0)]
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["queue_id"], a["event"], a["detail"]) for a in audit] == [
        ("QF", "flushed", "2 queued copies due now, by the operator"),
        ("QF", "flushed", "1 queued copy to @gmail.com due now, by the operator"),
        ("QG", "flushed", "1 queued copy to @gmail.com due now, by the operator")]


@pytest.mark.parametrize("large", [False, True], ids=["bytes in the database", "bytes in the spool"])
def test_requeue_starts_failed_and_quarantined_copies_over_at_their_origin(tmp_path: Path, large: bool) -> None:
    data = b"L" * IN_DATABASE + b"\r\n" if large else b"x\r\n"

    async def body(store: SqliteStore):  # type: ignore[no-untyped-def]
        pc, gmail = await store.accept(msg("QR", 100.0), data, two_copies(), [])
        await store.update(replace(gmail, target="box@backup.example", state="quarantined", attempts=3,
                                   detours=1, first_failure=150.0), [])
        await store.update(replace(pc, state="failed", attempts=1), [])
        await store.finish("QR", keep_until=None)  # quarantined: the bytes stay
        requeued = await store.requeue("QR", 500.0)
        again = await store.requeue("QR", 600.0)
        copies = sorted((c.target, c.state, c.attempts, c.detours, c.first_failure, c.next_at, c.hidden)
                        for c in await store.unfinished())
        story = await store.story("QR")
        # A message whose copies were all final had its bytes let go: nothing to requeue.
        [other] = await store.accept(msg("QX", 100.0), data, [NewCopy("r@example.com", "t@ex.org", False)], [])
        await store.update(replace(other, state="bounced", attempts=1), [])
        await store.finish("QX", keep_until=None)
        gone = await store.requeue("QX", 700.0)
        return requeued, again, copies, story, gone, await store.read("QR")

    requeued, again, copies, story, gone, kept = asyncio.run(with_store(tmp_path, body))
    assert (requeued, again) == (2, 0)
    assert copies == [("box@pc.example.net", "queued", 0, 0, None, 500.0, False),
                      ("hid@gmail.com", "queued", 0, 0, None, 500.0, True)]
    assert [(e.kind, e.target, e.detail) for e in story.events] == [
        ("requeued", "box@pc.example.net", "failed at box@pc.example.net: queued again at its first target, "
                                           "attempts reset, by the operator"),
        ("requeued", "hid@gmail.com", "quarantined at box@backup.example: queued again at its first target, "
                                      "attempts reset, by the operator")]
    assert gone == BytesGone()
    assert kept == data
    assert (tmp_path / "spool" / "QR").exists() == large and not (tmp_path / "spool" / "QX").exists()
