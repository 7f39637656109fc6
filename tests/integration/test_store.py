"""The SQLite store and spool: durable acceptance, grouped commits, finishing, keeping, orphans."""

import asyncio
import json
from dataclasses import replace
from pathlib import Path

from maildetour.store.records import Event, NewCopy, NewMessage
from maildetour.store.sqlite import SqliteStore


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


def msg(queue_id: str, at: float = 100.0) -> NewMessage:
    return NewMessage(queue_id, "a@b.example", at, f"<{queue_id}@x>", 5, "c [127.0.0.1]")


def test_concurrent_accepts_are_all_durable_with_their_copies_and_events(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> list[int]:
        made = await asyncio.gather(*(
            store.accept(msg(f"Q{i:03}"), b"data %d\r\n" % i, [NewCopy("r@ex.com", "t@ex.org", False)],
                         [Event(100.0, f"Q{i:03}", None, "accepted", "r@ex.com", "")])
            for i in range(50)))
        return [copies[0].id for copies in made]

    ids = asyncio.run(with_store(tmp_path, body))
    assert len(set(ids)) == 50
    assert sorted(p.name for p in (tmp_path / "spool").iterdir() if p.is_file()) == [f"Q{i:03}" for i in range(50)]

    async def reopened(store: SqliteStore) -> tuple[int, bytes]:
        return len(await store.unfinished()), await store.read("Q007")

    assert asyncio.run(with_store(tmp_path, reopened)) == (50, b"data 7\r\n")
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(lines) == 50 and {line["event"] for line in lines} == {"accepted"}


def test_finish_removes_the_bytes_unless_kept_for_late_bounces(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> tuple[bool, bool, bool, int, bool]:
        for queue_id in ("QA", "QB"):
            [copy] = await store.accept(msg(queue_id), b"x\r\n", [NewCopy("r@ex.com", "t@ex.org", False)], [])
            await store.update(replace(copy, state="delivered"), [])
        await store.finish("QA")
        await store.finish("QB", keep_until=200.0)
        kept_before = await store.kept("QB", 150.0)
        kept_after = await store.kept("QB", 250.0)
        gone = await store.kept("QA", 150.0)
        purged = await store.purge(250.0)
        return gone, kept_before, kept_after, purged, (tmp_path / "spool" / "QB").exists()

    gone, kept_before, kept_after, purged, file_left = asyncio.run(with_store(tmp_path, body))
    assert not gone and not (tmp_path / "spool" / "QA").exists()
    assert kept_before and not kept_after
    assert purged == 1 and not file_left


def test_spool_files_without_a_commit_are_removed_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    (tmp_path / "spool" / "ORPHAN").write_bytes(b"never acknowledged")
    (tmp_path / "spool" / "tmp" / "HALF").write_bytes(b"half written")

    async def body(store: SqliteStore) -> None:
        await store.accept(msg("QKEEP"), b"x\r\n", [NewCopy("r@ex.com", "t@ex.org", False)], [])

    asyncio.run(with_store(tmp_path, body))
    make(tmp_path).close()  # a restart
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["QKEEP", "tmp"]
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_story_is_found_by_queue_id_or_message_id(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> tuple[str, str, bool]:
        await store.accept(msg("QS"), b"x\r\n", [NewCopy("r@ex.com", "t@ex.org", False)],
                           [Event(100.0, "QS", -1, "accepted", "r@ex.com", "hello")])
        by_id = await store.story("QS")
        by_message_id = await store.story("QS@x")
        missing = await store.story("nope")
        assert by_id is not None and by_message_id is not None
        return by_id.events[0].detail, by_message_id.message.queue_id, missing is None

    assert asyncio.run(with_store(tmp_path, body)) == ("hello", "QS", True)
