"""Issue 14, the Store contract on both engines: the same behaviour tests run against the SQLite
store and against the PostgreSQL store on a real PostgreSQL (Debian's package, started on
loopback by `tests.peers.postgres`; skipped by hand without it, a failure under CI=true).

What they check, on each engine: durable acceptance of concurrent messages (seen again by a
store opened anew), the bytes read back, finishing and keeping for late bounces, stories by
queue id or Message-ID, copies born quarantined, the operator's hold, release, delete, flush
and requeue with their events and audit lines, the listing, attempt marks and the refused
delete, the due window and the oldest queued message, `finish_if_done`, and retention. On
PostgreSQL alone: the bytes live in the database, commits are synchronous, the schema is
made once and a newer one refused.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from maildetour.store.base import Store
from maildetour.store.listing import BytesGone, InFlight, QueueQuery
from maildetour.store.records import Event, Message, NewCopy
from maildetour.store.schema import SchemaTooNew
from maildetour.store.sqlite import SqliteStore
from tests.peers.postgres import PostgresPeer, running_postgres

if TYPE_CHECKING:
    from maildetour.store.postgres import PostgresStore  # (psycopg: imported once the peer runs)

T = TypeVar("T")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresPeer]:
    with running_postgres() as peer:
        yield peer


@dataclass
class Engine:
    """Where one test's queue lives, and how to open a store on it (again)."""

    name: str
    tmp: Path
    url: str | None = None

    @property
    def audit(self) -> Path:
        return self.tmp / "audit.jsonl"

    def open(self, *, node: str | None = "n1", readonly: bool = False) -> SqliteStore | PostgresStore:
        if self.url is None:
            return SqliteStore(self.tmp / "queue.sqlite3", self.tmp / "spool", self.audit, readonly=readonly)
        from maildetour.store.postgres import PostgresStore

        return PostgresStore(self.url, None if readonly else self.audit, node=None if readonly else node,
                             lease=6.0, connections=4)

    def run(self, body: Callable[[Any], Awaitable[T]], **kwargs: Any) -> T:
        async def main() -> T:
            store = self.open(**kwargs)
            try:
                async with store.running():
                    return await body(store)
            finally:
                store.close()

        return asyncio.run(main())

    def audit_events(self) -> list[str]:
        return [json.loads(line)["event"] for line in self.audit.read_text().splitlines()]


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "sqlite":
        return Engine("sqlite", tmp_path)
    peer: PostgresPeer = request.getfixturevalue("postgres")
    return Engine("postgres", tmp_path, peer.new_database())


def msg(queue_id: str, at: float = 100.0, size: int = 5) -> Message:
    return Message(queue_id, "a@b.example", at, f"<{queue_id}@x>", size, "c [127.0.0.1]")


def one() -> list[NewCopy]:
    return [NewCopy("r@ex.com", "t@ex.org", False)]


def two_copies() -> list[NewCopy]:
    return [NewCopy("r@example.com", "box@pc.example.net", False), NewCopy("r@example.com", "hid@gmail.com", True)]


def test_concurrent_accepts_are_all_durable_with_their_copies_and_events(engine: Engine) -> None:
    async def body(store: Store) -> list[int]:
        made = await asyncio.gather(*(
            store.accept(msg(f"Q{i:03}"), b"data %d\r\n\x00\xff" % i, one(),
                         [Event(100.0, f"Q{i:03}", None, "accepted", "r@ex.com", "")])
            for i in range(50)))
        return [copies[0].id for copies in made]

    ids = engine.run(body)
    assert len(set(ids)) == 50

    async def reopened(store: Store) -> tuple[int, bytes]:
        return len(await store.unfinished()), await store.read("Q007")

    assert engine.run(reopened, node="n2") == (50, b"data 7\r\n\x00\xff")
    assert engine.audit_events() == ["accepted"] * 50


def test_finish_removes_the_bytes_unless_kept_for_late_bounces(engine: Engine) -> None:
    async def body(store: Store) -> tuple[bool, bool, bool, int, bool]:
        for queue_id in ("QA", "QB"):
            [copy] = await store.accept(msg(queue_id), b"x\r\n", one(), [])
            await store.update(replace(copy, state="delivered"), [])
        await store.finish("QA")
        await store.finish("QB", keep_until=200.0)
        kept_before = await store.kept("QB", 150.0)
        kept_after = await store.kept("QB", 250.0)
        gone = await store.kept("QA", 150.0)
        purged = await store.purge(250.0)
        return gone, kept_before, kept_after, purged, await store.kept("QB", 150.0)

    gone, kept_before, kept_after, purged, still = engine.run(body)
    assert not gone and kept_before and not kept_after
    assert purged == 1 and not still


def test_finish_if_done_waits_for_the_last_queued_copy(engine: Engine) -> None:
    async def body(store: Store) -> tuple[bool, bool, bool]:
        first, second = await store.accept(msg("QD"), b"x\r\n", two_copies(), [])
        await store.update(replace(first, state="delivered", attempts=1), [])
        early = await store.finish_if_done("QD")
        await store.update(replace(second, state="delivered", attempts=1), [])
        done = await store.finish_if_done("QD")
        return early, done, await store.kept("QD", 100.0)

    assert engine.run(body) == (False, True, False)


def test_story_is_found_by_queue_id_or_message_id(engine: Engine) -> None:
    async def body(store: Store) -> tuple[str, str, bool]:
        await store.accept(msg("QS"), b"x\r\n", one(), [Event(100.0, "QS", None, "accepted", "r@ex.com", "hello")])
        by_id = await store.story("QS")
        by_message_id = await store.story("QS@x")
        missing = await store.story("nope")
        assert by_id is not None and by_message_id is not None
        return by_id.events[0].detail, by_message_id.message.queue_id, missing is None

    assert engine.run(body) == ("hello", "QS", True)


def test_a_copy_born_quarantined_gets_its_event_with_its_own_id(engine: Engine) -> None:
    async def body(store: Store):  # type: ignore[no-untyped-def]
        made = await store.accept(msg("QL"), b"x\r\n", [
            NewCopy("r@ex.com", "a@ex.org", False, "quarantined", "mail loop"),
            NewCopy("r@ex.com", "b@ex.org", False, "quarantined", "mail loop")], [])
        return made, await store.story("QL"), await store.unfinished()

    made, story, queued = engine.run(body)
    assert [(e.kind, e.copy_id, e.target, e.detail) for e in story.events] == [
        ("quarantined", made[0].id, "a@ex.org", "mail loop"), ("quarantined", made[1].id, "b@ex.org", "mail loop")]
    assert queued == []
    assert engine.audit_events() == ["quarantined", "quarantined"]


def test_hold_release_and_delete_change_copies_with_audit_events(engine: Engine) -> None:
    async def body(store: Store):  # type: ignore[no-untyped-def]
        [queued] = await store.accept(msg("QH"), b"x\r\n", one(), [])
        held = await store.hold("QH", 300.0)
        # An attempt that was in flight does not undo the operator's hold.
        applied = await store.update(replace(queued, state="queued", attempts=1, next_at=999.0), [])
        listed = await store.copies(("held",), 10)
        not_queued = await store.unfinished()
        released = await store.release("QH", 400.0)
        again = await store.unfinished()
        deleted = await store.delete("QH", 500.0)
        nothing_left = await store.delete("QH", 600.0)
        return (held, applied, listed, not_queued, released, again, deleted, nothing_left, await store.story("QH"),
                await store.kept("QH", 600.0))

    held, applied, listed, not_queued, released, again, deleted, nothing_left, story, kept = engine.run(body)
    assert (held, applied, released, deleted, nothing_left) == (1, False, 1, 1, 0)
    assert [c.state for c in listed] == ["held"] and not_queued == []
    assert [(c.state, c.next_at, c.attempts) for c in again] == [("queued", 400.0, 0)]
    assert [c.state for c in story.copies] == ["deleted"]
    assert [e.kind for e in story.events] == ["held", "released", "deleted"]
    assert not kept  # nothing left to deliver: the bytes went
    assert engine.audit_events() == ["held", "released", "deleted"]


def test_release_takes_quarantined_copies_and_flush_makes_queued_ones_due(engine: Engine) -> None:
    async def body(store: Store):  # type: ignore[no-untyped-def]
        [copy] = await store.accept(msg("QQ"), b"x\r\n", one(), [])
        await store.update(replace(copy, state="quarantined", attempts=3), [])
        await store.accept(msg("QF"), b"x\r\n", one(), [])
        flushed = await store.flush(50.0)
        released = await store.release("QQ", 60.0)
        return flushed, released, sorted((c.queue_id, c.next_at) for c in await store.unfinished())

    assert engine.run(body) == (1, 1, [("QF", 50.0), ("QQ", 60.0)])


def test_the_listing_filters_orders_limits_and_counts_what_matched(engine: Engine) -> None:
    async def body(store: Store):  # type: ignore[no-untyped-def]
        made = {}
        for queue_id, at in (("QA", 100.0), ("QB", 200.0), ("QC", 300.0)):
            made[queue_id] = await store.accept(msg(queue_id, at, 1000), b"x\r\n", two_copies(), [])
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
                await store.listing(QueueQuery(dest="nobody.example")), gmail_a.id)

    default, newest, filtered, nothing, gmail_a = engine.run(body)
    assert [m.message.queue_id for m in default.messages] == ["QA", "QB", "QC"]
    assert (default.matched_messages, default.matched_copies, default.matched_bytes) == (3, 5, 3000)
    [gmail] = default.messages[0].copies
    assert gmail.copy.id == gmail_a and gmail.copy.attempts == 2
    assert gmail.last_reply is not None and gmail.last_reply.detail == "attempt 2: 452 full"
    assert [m.message.queue_id for m in newest.messages] == ["QC", "QB"] and newest.truncated
    assert [(m.message.queue_id, [c.copy.target for c in m.copies]) for m in filtered.messages] == [
        ("QA", ["hid@gmail.com"]), ("QB", ["hid@gmail.com"])]
    assert (nothing.messages, nothing.matched_messages, nothing.matched_bytes) == ((), 0, 0)


def test_a_copy_marked_in_an_attempt_is_not_deleted_until_its_update(engine: Engine) -> None:
    async def body(store: Store):  # type: ignore[no-untyped-def]
        pc, gmail = await store.accept(msg("QM"), b"x\r\n", two_copies(), [])
        await store.claim([gmail], 150.0)
        store.started([gmail.id], 150.0)
        await asyncio.sleep(0.3)  # the mark commits on its own soon
        listed = await store.listing(QueueQuery())
        refused = await store.delete("QM", 160.0, refuse_in_flight=True)
        await store.update(replace(gmail, attempts=1, next_at=900.0), [])  # the attempt reports
        after = await store.listing(QueueQuery())
        deleted = await store.delete("QM", 170.0, refuse_in_flight=True)
        return listed, refused, after, deleted, gmail.id, await store.story("QM")

    listed, refused, after, deleted, gmail_id, story = engine.run(body)
    assert {c.copy.id: c.in_flight_since for c in listed.messages[0].copies}[gmail_id] == 150.0
    assert refused == InFlight((gmail_id,))
    assert all(c.in_flight_since is None for c in after.messages[0].copies)
    assert deleted == 2 and [e.kind for e in story.events] == ["deleted"]


def test_flush_by_destination_and_requeue_to_the_origin(engine: Engine) -> None:
    async def body(store: Store):  # type: ignore[no-untyped-def]
        pc, gmail = await store.accept(msg("QR"), b"x\r\n", two_copies(), [])
        await store.update(replace(pc, next_at=900.0, attempts=1), [])
        await store.update(replace(gmail, next_at=900.0, attempts=1), [])
        flushed = await store.flush(200.0, dest="gmail.com")
        due = sorted((c.target, c.next_at) for c in await store.unfinished())
        await store.update(replace(gmail, target="detour@ex.net", state="quarantined", attempts=4, detours=1), [])
        requeued = await store.requeue("QR", 300.0)
        again = await store.find_copy("QR", "hid@gmail.com")
        await store.update(replace(pc, state="delivered", attempts=2), [])
        assert again is not None
        await store.update(replace(again, state="delivered", attempts=1), [])
        await store.finish("QR")
        await store.update(replace(again, state="quarantined"), [])
        gone = await store.requeue("QR", 400.0)
        return flushed, due, requeued, again, gone

    flushed, due, requeued, again, gone = engine.run(body)
    assert flushed == 1 and due == [("box@pc.example.net", 900.0), ("hid@gmail.com", 200.0)]
    assert requeued == 1
    assert (again.state, again.target, again.attempts, again.detours, again.next_at) == (
        "queued", "hid@gmail.com", 0, 0, 300.0)
    assert gone == BytesGone()


def test_due_is_a_window_soonest_first_and_counts_the_rest(engine: Engine) -> None:
    async def body(store: Store):  # type: ignore[no-untyped-def]
        for i, at in enumerate((500.0, 100.0, 300.0, 200.0)):
            await store.accept(msg(f"Q{i}", at), b"x\r\n", one(), [])
        return await store.due(400.0, 2), await store.due(1000.0, 10), await store.oldest_queued()

    window, everything, oldest = engine.run(body)
    assert [c.next_at for c in window.copies] == [100.0, 200.0] and window.later == 2
    assert [c.next_at for c in everything.copies] == [100.0, 200.0, 300.0, 500.0] and everything.later == 0
    assert oldest == 100.0


def test_retention_removes_old_finished_messages_and_expires_quarantined_copies(engine: Engine) -> None:
    async def body(store: Store):  # type: ignore[no-untyped-def]
        for queue_id, at in (("QOLD", 100.0), ("QNEW", 5000.0)):
            [copy] = await store.accept(msg(queue_id, at), b"x\r\n", one(), [Event(at, queue_id, None, "accepted",
                                                                                     "r@ex.com", "")])
            await store.update(replace(copy, state="delivered", next_at=at + 1),
                               [Event(at + 1, queue_id, copy.id, "delivered", copy.target, "")])
            await store.finish(queue_id)
        [q] = await store.accept(msg("QQ", 100.0), b"x\r\n", one(), [])
        await store.update(replace(q, state="quarantined", next_at=150.0), [])
        [live] = await store.accept(msg("QLIVE", 50.0), b"x\r\n", one(), [])
        before = await store.retention_report(6000.0)
        expired = await store.expire_quarantined(1000.0, 6000.0, 10)
        purged = await store.purge_finished(1000.0, 6000.0, 10)
        return (before, expired, purged, await store.story("QOLD"), await store.story("QNEW"),
                await store.story("QLIVE"), await store.story("QQ"))

    before, expired, purged, old, new, live, quarantined = engine.run(body)
    assert (before.finished, before.quarantined) == (2, 1)
    assert expired == 1 and quarantined is not None and quarantined.copies[0].state == "deleted"
    assert purged >= 1 and old is None and new is not None and live is not None


# --- PostgreSQL alone ---------------------------------------------------------------------------
def test_the_bytes_are_in_the_database_and_commits_are_synchronous(postgres: PostgresPeer, tmp_path: Path) -> None:
    url = postgres.new_database()
    engine = Engine("postgres", tmp_path, url)
    engine.run(lambda store: store.accept(msg("QB1"), b"hello\r\n", one(), []))
    database = url.rsplit("/", 1)[1]
    stored = postgres.psql("SELECT encode(data, 'hex') FROM bodies WHERE queue_id = 'QB1'", database)
    assert stored == b"hello\r\n".hex()
    assert postgres.psql("SHOW synchronous_commit", database) == "on"
    assert not list(tmp_path.glob("spool*"))  # no file of the message on this node


def test_the_schema_is_made_once_and_a_newer_one_is_refused(postgres: PostgresPeer, tmp_path: Path) -> None:
    url = postgres.new_database()
    engine = Engine("postgres", tmp_path, url)

    async def both() -> None:  # two nodes starting at once make it once
        stores = [engine.open(node="a"), engine.open(node="b")]
        try:
            async with stores[0].running(), stores[1].running():
                pass
        finally:
            for store in stores:
                store.close()

    asyncio.run(both())
    database = url.rsplit("/", 1)[1]
    assert postgres.psql("SELECT count(*) FROM schema_version", database) == "1"
    postgres.psql("UPDATE schema_version SET version = version + 1", database)
    with pytest.raises(SchemaTooNew):
        engine.run(lambda store: store.unfinished())
