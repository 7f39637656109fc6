"""Retention (issue 12): finished messages, their events and spool files go `retention` after
they finished; quarantined copies are deleted after `quarantine_retention`; bytes kept for late
bounces and copies still to deliver are never purged; the sweep works in small batches; and a
running server keeps its store bounded."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

from maildetour.config.reader import ConfigError
from maildetour.store.records import Event, Message, NewCopy
from maildetour.store.retention import RetentionRules, Sweeper
from maildetour.store.sqlite import SqliteStore
from tests.configs import SEED, seed_config
from tests.harness import message, running_server

T = TypeVar("T")
DAY = 86400.0


def run(tmp_path: Path, body: Callable[[SqliteStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = SqliteStore(tmp_path / "queue.sqlite3", tmp_path / "spool", tmp_path / "audit.jsonl")
        try:
            async with store.running():
                return await body(store)
        finally:
            store.close()

    return asyncio.run(main())


async def settled(store: SqliteStore, queue_id: str, at: float, *states: str,
                  keep_until: float | None = None) -> None:
    """A message received at `at` whose copies end in `states` one second later ("queued" stays)."""
    made = await store.accept(Message(queue_id, "a@b.example", at, f"<{queue_id}@x>", 5, "c [127.0.0.1]"),
                              b"bytes\r\n", [NewCopy("r@ex.com", f"t{i}@ex.org", False) for i in range(len(states))],
                              [Event(at, queue_id, None, "accepted", "r@ex.com", "")])
    for copy, state in zip(made, states):
        if state != "queued":
            await store.update(replace(copy, state=state, next_at=at + 1),  # type: ignore[arg-type]
                               [Event(at + 1, queue_id, copy.id, state, copy.target, "")])  # type: ignore[arg-type]
    if "queued" not in states:
        await store.finish(queue_id, keep_until)


def left(tmp_path: Path) -> tuple[list[str], list[str], list[str]]:
    """Queue ids with rows in messages, with events, and with bytes kept (in the database's
    `bodies`, small ones, or as a spool file)."""
    conn = sqlite3.connect(tmp_path / "queue.sqlite3")
    try:
        rows = [r[0] for r in conn.execute("SELECT queue_id FROM messages ORDER BY queue_id")]
        events = [r[0] for r in conn.execute("SELECT DISTINCT queue_id FROM events ORDER BY queue_id")]
        in_db = {r[0] for r in conn.execute("SELECT queue_id FROM bodies")}
    finally:
        conn.close()
    files = {p.name for p in (tmp_path / "spool").iterdir() if p.is_file()}
    return rows, events, sorted(in_db | files)


def test_finished_messages_go_with_their_events_and_bytes_and_nothing_still_needed_does(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> int:
        await settled(store, "OLD-DELIVERED", 1 * DAY, "delivered", "delivered")
        await settled(store, "OLD-BOUNCED", 2 * DAY, "bounced")
        await settled(store, "KEPT-FOR-LATE-BOUNCES", 3 * DAY, "delivered", keep_until=50 * DAY)
        await settled(store, "STILL-QUEUED", 4 * DAY, "delivered", "queued")
        await settled(store, "QUARANTINED", 5 * DAY, "quarantined")
        await settled(store, "RECENT", 35 * DAY, "delivered")
        return await store.purge_finished(before=40 * DAY - 30 * DAY, now=40 * DAY, limit=500)

    assert run(tmp_path, body) == 2
    kept = ["KEPT-FOR-LATE-BOUNCES", "QUARANTINED", "RECENT", "STILL-QUEUED"]
    assert left(tmp_path) == (kept, kept, ["KEPT-FOR-LATE-BOUNCES", "QUARANTINED", "STILL-QUEUED"])


def test_retention_counts_from_when_the_message_finished_not_from_when_it_arrived(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> tuple[int, int]:
        made = await store.accept(Message("SLOW", "a@b.example", 1 * DAY, "", 5, "c"), b"x\r\n",
                                  [NewCopy("r@ex.com", "t@ex.org", False)], [])
        await store.update(replace(made[0], state="delivered"),  # delivered after 20 days of retries
                           [Event(21 * DAY, "SLOW", made[0].id, "delivered", "t@ex.org", "250 ok")])
        await store.finish("SLOW")
        early = await store.purge_finished(before=40 * DAY - 30 * DAY, now=40 * DAY, limit=500)
        later = await store.purge_finished(before=52 * DAY - 30 * DAY, now=52 * DAY, limit=500)
        return early, later

    assert run(tmp_path, body) == (0, 1)


def test_a_message_never_marked_finished_goes_too_once_nothing_is_left_to_deliver(tmp_path: Path) -> None:
    """A crash between a copy's last update and `finish` must not leave the message for ever."""
    async def body(store: SqliteStore) -> int:
        made = await store.accept(Message("STRANDED", "a@b.example", 1 * DAY, "", 5, "c"), b"x\r\n",
                                  [NewCopy("r@ex.com", "t@ex.org", False)], [])
        await store.update(replace(made[0], state="delivered"), [])  # ... and no finish
        return await store.purge_finished(before=40 * DAY - 30 * DAY, now=40 * DAY, limit=500)

    assert run(tmp_path, body) == 1
    assert left(tmp_path) == ([], [], [])


def test_quarantined_copies_are_deleted_after_their_own_retention_and_kept_for_trace(tmp_path: Path) -> None:
    async def body(store: SqliteStore):  # type: ignore[no-untyped-def]
        await settled(store, "Q-OLD", 1 * DAY, "quarantined", "delivered")
        await settled(store, "Q-NEW", 80 * DAY, "quarantined")
        await settled(store, "Q-AND-QUEUED", 2 * DAY, "quarantined", "queued")
        expired = await store.expire_quarantined(before=100 * DAY - 90 * DAY, now=100 * DAY, limit=500)
        purged_now = await store.purge_finished(before=100 * DAY - 30 * DAY, now=100 * DAY, limit=500)
        return expired, purged_now, await store.story("Q-OLD"), await store.story("Q-AND-QUEUED")

    expired, purged_now, story, still_queued = run(tmp_path, body)
    assert (expired, purged_now) == (2, 0)  # deleted copies stay visible for another `retention`
    assert [c.state for c in story.copies] == ["deleted", "delivered"]
    assert story.events[-1].kind == "deleted" and "quarantine_retention" in story.events[-1].detail
    assert [c.state for c in still_queued.copies] == ["deleted", "queued"]
    assert left(tmp_path)[2] == ["Q-AND-QUEUED", "Q-NEW"]  # Q-OLD's bytes went with its last copy


def test_the_sweep_goes_batch_by_batch_until_nothing_is_due(tmp_path: Path) -> None:
    now = [0.0]

    async def body(store: SqliteStore) -> tuple[int, int, list[int]]:
        for i in range(23):
            await settled(store, f"M{i:03}", 1 * DAY + i, "delivered")
        await settled(store, "Q", 1 * DAY, "quarantined")
        batches: list[int] = []
        purge = store.purge_finished

        async def counted(before: float, at: float, limit: int) -> int:
            batches.append(await purge(before, at, limit))
            return batches[-1]

        store.purge_finished = counted  # type: ignore[method-assign]
        now[0] = 100 * DAY
        sweeper = Sweeper(store, RetentionRules(retention=30 * DAY, quarantine_retention=90 * DAY, interval=600.0,
                                                batch=5, pause=0.0), lambda: now[0])
        swept = await sweeper.sweep()
        return swept.purged, swept.expired, batches

    purged, expired, batches = run(tmp_path, body)
    assert (purged, expired) == (23, 1)
    assert batches == [5, 5, 5, 5, 3]  # the message whose quarantined copy expired finished just now
    assert left(tmp_path)[0] == ["Q"]


def test_kept_for_ever_when_the_retentions_are_0(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> tuple[int, int]:
        await settled(store, "OLD", 1 * DAY, "delivered")
        await settled(store, "Q", 1 * DAY, "quarantined")
        swept = await Sweeper(store, RetentionRules(None, None, 600.0), lambda: 1000 * DAY).sweep()
        return swept.purged, swept.expired

    assert run(tmp_path, body) == (0, 0)


def test_the_retention_report_counts_what_is_kept_beyond_the_queue(tmp_path: Path) -> None:
    async def body(store: SqliteStore):  # type: ignore[no-untyped-def]
        await settled(store, "DONE", 1 * DAY, "delivered")
        await settled(store, "KEPT", 2 * DAY, "delivered", keep_until=5 * DAY)
        await settled(store, "Q", 3 * DAY, "quarantined")
        await store.accept(Message("LATE", "", 4 * DAY, "", 5, "c"), b"dsn\r\n", [],  # a late bounce: no copies
                           [Event(4 * DAY, "LATE", None, "accepted", "", "DSN to our SRS address")])
        await store.finish("LATE", 7 * DAY)
        return await store.retention_report(4 * DAY)

    report = run(tmp_path, body)
    assert (report.finished, report.oldest_finished) == (4, 1 * DAY + 1)
    assert (report.kept_for_late_bounces, report.kept_until) == (2, 7 * DAY)
    assert report.late_bounces == 1
    assert (report.quarantined, report.oldest_quarantined) == (1, 3 * DAY + 1)


def test_store_keys_are_read_and_0_means_for_ever(tmp_path: Path) -> None:
    config = seed_config(tmp_path, SEED + '\n[store]\nretention = "7d"\nquarantine_retention = "0"\n'
                                          'sweep_interval = "1m"\n')
    assert (config.store.retention, config.store.quarantine_retention, config.store.sweep_interval) == (
        7 * DAY, None, 60.0)
    default = seed_config(tmp_path, SEED).store
    assert (default.retention, default.quarantine_retention) == (30 * DAY, 90 * DAY)
    for bad in ('retention = "soon"', 'sweep_interval = "0"', 'retain = "1d"'):
        try:
            seed_config(tmp_path, SEED + f"\n[store]\n{bad}\n")
        except ConfigError as exc:
            assert str(exc).startswith(f"store.{bad.split(' ')[0]}:")
        else:
            raise AssertionError(f"{bad} was accepted")


def test_a_running_server_purges_finished_mail_and_its_store_stays_small(tmp_path: Path) -> None:
    extra = '[store]\nretention = "1s"\nsweep_interval = "200ms"\n'
    with running_server(tmp_path, delivery_extra='late_bounce_window = "1s"', extra=extra) as server:
        ids = [server.send(message(f"retention {i}")) for i in range(5)]
        server.wait_mailbox("ituki@pc.example.net", 5)
        server.wait_mailbox("ituki@gm.example.net", 5)  # "gmail" is unreachable: the detour

        def spooled() -> list[str]:
            """Messages with bytes kept: spool files, and (small ones) rows of `bodies`."""
            conn = sqlite3.connect(server.state / "queue.sqlite3")
            try:
                in_db = [r[0] for r in conn.execute("SELECT queue_id FROM bodies")]
            finally:
                conn.close()
            return in_db + [p.name for p in (server.state / "spool").iterdir() if p.is_file()]

        kept = spooled()  # the bytes of the last ones at least are kept for the late-bounce window
        assert kept and set(kept) <= set(ids)
        # The rows go first, the spool files a moment later (the sweep removes them off the loop).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (any(server.events(q) for q in ids) or spooled()):
            time.sleep(0.1)
        assert not any(server.events(q) for q in ids), server.log()
        assert spooled() == []
        traced = server.cli("trace", ids[0])
        assert traced.returncode == 1 and "no message" in traced.stderr
        assert "retention: removed" in server.log()
