"""The SQLite store and spool: durable acceptance, grouped commits, finishing, keeping, orphans,
and the operator's hands on the queue (hold, release, delete, flush) with their audit events.
A small message keeps its bytes in the queue database, a larger one (over IN_DATABASE) in the
spool: what is about bytes is checked for both."""

import asyncio
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from maildetour.store.records import Event, Message, NewCopy
from maildetour.store.sqlite import IN_DATABASE, SqliteStore

LARGE = b"L" * IN_DATABASE + b"\r\n"  # over IN_DATABASE: spooled
SIZES = pytest.mark.parametrize("large", [False, True], ids=["in the database", "in the spool"])


def payload(text: bytes, large: bool) -> bytes:
    return LARGE + text if large else text


def bytes_at(tmp_path: Path, queue_id: str) -> str | None:
    """Where the store keeps `queue_id`'s bytes: "database", "spool", or None (gone)."""
    conn = sqlite3.connect(tmp_path / "queue.sqlite3")
    try:
        in_db = conn.execute("SELECT 1 FROM bodies WHERE queue_id=?", (queue_id,)).fetchone() is not None
    finally:
        conn.close()
    in_spool = (tmp_path / "spool" / queue_id).exists()
    assert not (in_db and in_spool), queue_id
    return "database" if in_db else "spool" if in_spool else None


def make(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "queue.sqlite3", tmp_path / "spool", tmp_path / "audit.jsonl")


async def with_store(tmp_path: Path, body):  # type: ignore[no-untyped-def]
    store = make(tmp_path)
    writer = asyncio.create_task(store.run())
    try:
        return await body(store)
    finally:
        writer.cancel()
        store.close()


def msg(queue_id: str, at: float = 100.0) -> Message:
    return Message(queue_id, "a@b.example", at, f"<{queue_id}@x>", 5, "c [127.0.0.1]")


@SIZES
def test_concurrent_accepts_are_all_durable_with_their_copies_and_events(tmp_path: Path, large: bool) -> None:
    async def body(store: SqliteStore) -> list[int]:
        made = await asyncio.gather(*(
            store.accept(msg(f"Q{i:03}"), payload(b"data %d\r\n" % i, large), [NewCopy("r@ex.com", "t@ex.org", False)],
                         [Event(100.0, f"Q{i:03}", None, "accepted", "r@ex.com", "")])
            for i in range(50)))
        return [copies[0].id for copies in made]

    ids = asyncio.run(with_store(tmp_path, body))
    assert len(set(ids)) == 50
    assert {bytes_at(tmp_path, f"Q{i:03}") for i in range(50)} == {"spool" if large else "database"}

    async def reopened(store: SqliteStore) -> tuple[int, bytes]:  # a new store: nothing in memory
        return len(await store.unfinished()), await store.read("Q007")

    assert asyncio.run(with_store(tmp_path, reopened)) == (50, payload(b"data 7\r\n", large))
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(lines) == 50 and {line["event"] for line in lines} == {"accepted"}


@SIZES
def test_finish_removes_the_bytes_unless_kept_for_late_bounces(tmp_path: Path, large: bool) -> None:
    async def body(store: SqliteStore) -> tuple[bool, bool, bool, int, str | None]:
        for queue_id in ("QA", "QB"):
            [copy] = await store.accept(msg(queue_id), payload(b"x\r\n", large),
                                        [NewCopy("r@ex.com", "t@ex.org", False)], [])
            await store.update(replace(copy, state="delivered"), [])
        await store.finish("QA")
        await store.finish("QB", keep_until=200.0)
        kept_before = await store.kept("QB", 150.0)
        kept_after = await store.kept("QB", 250.0)
        gone = await store.kept("QA", 150.0)
        purged = await store.purge(250.0)
        return gone, kept_before, kept_after, purged, bytes_at(tmp_path, "QB")

    gone, kept_before, kept_after, purged, left = asyncio.run(with_store(tmp_path, body))
    assert not gone and bytes_at(tmp_path, "QA") is None
    assert kept_before and not kept_after
    assert purged == 1 and left is None


def test_spool_files_without_a_commit_are_removed_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    (tmp_path / "spool" / "ORPHAN").write_bytes(b"never acknowledged")
    (tmp_path / "spool" / "tmp" / "HALF").write_bytes(b"half written")

    async def body(store: SqliteStore) -> None:
        await store.accept(msg("QKEEP"), LARGE, [NewCopy("r@ex.com", "t@ex.org", False)], [])

    asyncio.run(with_store(tmp_path, body))
    restarted = make(tmp_path)
    restarted.recover()  # what the server does at start-up
    restarted.close()
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["QKEEP", "tmp"]
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_story_is_found_by_queue_id_or_message_id(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> tuple[str, str, bool]:
        await store.accept(msg("QS"), b"x\r\n", [NewCopy("r@ex.com", "t@ex.org", False)],
                           [Event(100.0, "QS", None, "accepted", "r@ex.com", "hello")])
        by_id = await store.story("QS")
        by_message_id = await store.story("QS@x")
        missing = await store.story("nope")
        assert by_id is not None and by_message_id is not None
        return by_id.events[0].detail, by_message_id.message.queue_id, missing is None

    assert asyncio.run(with_store(tmp_path, body)) == ("hello", "QS", True)


def test_opening_beside_a_running_server_removes_nothing(tmp_path: Path) -> None:
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    (tmp_path / "spool" / "tmp" / "BEING-WRITTEN").write_bytes(b"a server's write in progress")
    make(tmp_path).close()  # a command opening the store, without recover()
    assert (tmp_path / "spool" / "tmp" / "BEING-WRITTEN").exists()


def test_a_copy_born_quarantined_gets_its_event_with_its_own_id(tmp_path: Path) -> None:
    async def body(store: SqliteStore):  # type: ignore[no-untyped-def]
        made = await store.accept(msg("QL"), b"x\r\n", [
            NewCopy("r@ex.com", "a@ex.org", False, "quarantined", "mail loop"),
            NewCopy("r@ex.com", "b@ex.org", False, "quarantined", "mail loop")], [])
        return made, await store.story("QL")

    made, story = asyncio.run(with_store(tmp_path, body))
    assert [(e.kind, e.copy_id, e.target, e.detail) for e in story.events] == [
        ("quarantined", made[0].id, "a@ex.org", "mail loop"), ("quarantined", made[1].id, "b@ex.org", "mail loop")]
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["event"], a["copy"]) for a in audit] == [("quarantined", made[0].id), ("quarantined", made[1].id)]


def test_hold_release_and_delete_change_copies_with_audit_events(tmp_path: Path) -> None:
    async def body(store: SqliteStore):  # type: ignore[no-untyped-def]
        [queued] = await store.accept(msg("QH"), b"x\r\n", [NewCopy("r@ex.com", "t@ex.org", False)], [])
        held = await store.hold("QH", 300.0)
        # An attempt that was in flight does not undo the operator's hold.
        applied = await store.update(replace(queued, state="queued", attempts=1, next_at=999.0), [])
        listed = await store.copies(("held",), 10)
        not_queued = await store.unfinished()
        released = await store.release("QH", 400.0)
        again = await store.unfinished()
        deleted = await store.delete("QH", 500.0)
        nothing_left = await store.delete("QH", 600.0)
        story = await store.story("QH")
        return held, applied, listed, not_queued, released, again, deleted, nothing_left, story

    held, applied, listed, not_queued, released, again, deleted, nothing_left, story = asyncio.run(
        with_store(tmp_path, body))
    assert (held, applied, released, deleted, nothing_left) == (1, False, 1, 1, 0)
    assert [c.state for c in listed] == ["held"] and not_queued == []
    assert [(c.state, c.next_at, c.attempts) for c in again] == [("queued", 400.0, 0)]
    assert [c.state for c in story.copies] == ["deleted"]
    assert [e.kind for e in story.events] == ["held", "released", "deleted"]
    assert bytes_at(tmp_path, "QH") is None  # nothing left to deliver: the bytes went
    audit = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit == ["held", "released", "deleted"]


def test_release_takes_quarantined_copies_and_flush_makes_queued_ones_due(tmp_path: Path) -> None:
    async def body(store: SqliteStore):  # type: ignore[no-untyped-def]
        [copy] = await store.accept(msg("QQ"), b"x\r\n", [NewCopy("r@ex.com", "t@ex.org", False)], [])
        await store.update(replace(copy, state="quarantined", attempts=3), [])
        await store.accept(msg("QF"), b"x\r\n", [NewCopy("r@ex.com", "t@ex.org", False)], [])
        flushed = await store.flush(50.0)
        released = await store.release("QQ", 60.0)
        return flushed, released, sorted((c.queue_id, c.next_at) for c in await store.unfinished())

    assert asyncio.run(with_store(tmp_path, body)) == (1, 1, [("QF", 50.0), ("QQ", 60.0)])


def test_a_read_only_store_reads_what_the_writer_wrote(tmp_path: Path) -> None:
    async def write(store: SqliteStore) -> None:
        await store.accept(msg("QR"), b"x\r\n", [NewCopy("r@ex.com", "t@ex.org", False)], [])

    asyncio.run(with_store(tmp_path, write))

    async def read() -> tuple[int, str]:
        store = SqliteStore(tmp_path / "queue.sqlite3", tmp_path / "spool", tmp_path / "audit.jsonl", readonly=True)
        try:
            async with store.running():
                story = await store.story("QR")
                assert story is not None
                return len(await store.copies(None, 10)), story.message.client
        finally:
            store.close()

    assert asyncio.run(read()) == (1, "c [127.0.0.1]")
