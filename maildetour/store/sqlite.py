"""The embedded store: SQLite (WAL, synchronous=FULL) for the queue, spool files for the bytes.

Internal. One writer thread does every write; writes that arrive while it is busy are grouped
into one transaction (group commit: one fsync of the spool directory and one WAL fsync for many
messages), and none is acknowledged before its own commit. Events are appended to the JSON-lines
audit log after they commit. Recently accepted bytes are kept in memory (`store.cache`) for the
first attempts. Fails with OSError/sqlite3.Error to the caller (inbound answers 451; delivery
keeps the copy in memory and retries).
The server opens it with `recover()` (start-up clean-up); the operator's commands open it beside
a running server (`readonly=True` for what only reads), and run the writer with `running()`.
Opening makes or upgrades the database to our schema version (`store.schema`; the operator's
commands refuse an older one instead). Retention removes what is done in batches of at most a
few hundred messages per transaction (`purge`, `expire_quarantined`, `purge_finished`), so the
writer is never held long.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from maildetour.durable import make_dirs
from maildetour.store import sqlite_queue as queue_sql
from maildetour.store.audit import AuditLog
from maildetour.store.cache import BytesCache
from maildetour.store.listing import BytesGone, InFlight, QueueListing, QueueQuery
from maildetour.store.records import (
    FINAL_STATES,
    Copy,
    CopyState,
    DueCopies,
    Event,
    Message,
    NewCopy,
    Story,
)
from maildetour.store.retention import RetentionReport
from maildetour.store.schema import open_database
from maildetour.store.spool import Spool

T = TypeVar("T")
log = logging.getLogger("maildetour.store")

# The schema and its versions are in `store.schema` (opened and upgraded by `open_database`).
_COPY_COLUMNS = (
    "c.id, c.queue_id, m.mail_from, c.recipient, c.target, coalesce(c.origin, c.target), c.hidden_origin,"
    " c.state, c.attempts, c.next_at, c.first_failure, c.detours, m.received_at, m.size"
)


def _copy(row: Sequence[Any]) -> Copy:
    return Copy(
        id=row[0], queue_id=row[1], mail_from=row[2], recipient=row[3], target=row[4], origin=row[5],
        hidden=bool(row[6]), state=row[7], attempts=row[8], next_at=row[9],
        first_failure=row[10], detours=row[11], received_at=row[12], size=row[13],
    )


def connect(path: Path, *, readonly: bool = False, upgrade: bool = True) -> sqlite3.Connection:
    """The queue database, made or upgraded to our schema version (`store.schema`)."""
    return open_database(path, readonly=readonly, upgrade=upgrade)


class _Op:
    __slots__ = ("func", "future", "needs_spool_sync", "events")

    def __init__(self, func: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any],
                 needs_spool_sync: bool, events: Sequence[Event]) -> None:
        self.func, self.future = func, future
        self.needs_spool_sync, self.events = needs_spool_sync, events


# A failed transaction keeps the store "not ready" this long, unless one commits meanwhile: a
# queue with nothing to write must not stay unready for ever after one failure.
_FAILURE_SHOWN = 60.0

# How long an attempt's mark (`started`) waits for a transaction to ride with before it gets
# one of its own: most attempts end sooner, and a mark matters only to a `queue delete` that
# comes during a longer one (issue 12).
_MARK_AFTER = 0.1

# States an attempt's update must not overwrite: the operator's hand wins.
_OPERATOR_STATES = "('held', 'deleted')"
_FINAL = "(" + ", ".join(f"'{s}'" for s in FINAL_STATES) + ")"
# The write lock held by another process (an intake worker's writer, or the main process's):
# first retry after 0.1 ms, then twice as long each time up to 2 ms, for at most 30 s.
_SQLITE_BUSY = 5
_BUSY_FIRST, _BUSY_LONGEST, _BUSY_WAIT = 0.0001, 0.002, 30.0
# Messages per transaction when `purge` removes kept bytes (tens of milliseconds each).
_PURGE_BATCH = 500
# A message up to this size keeps its bytes in the queue database (the `bodies` table),
# committed with its rows: no spool file to make, fsync and remove (on this bench's ext4 that
# was a fifth of the main process's CPU). Larger ones go to the spool.
IN_DATABASE = 128 * 1024


def in_database(size: int) -> bool:
    """Whether a message of `size` bytes keeps them in the queue database (else in the spool).
    The one rule `accept`, an SMTP intake worker and the main process's `enter` all follow."""
    return size <= IN_DATABASE


class SqliteStore:
    def __init__(self, db_path: Path, spool_dir: Path, audit_path: Path, *, cache_bytes: int = 0,
                 cache_seconds: float = 0.0, readonly: bool = False, upgrade: bool = True) -> None:
        """`upgrade`: an older database may be upgraded in place (the server; see `store.schema`);
        else it is refused (SchemaTooOld), as one from a newer maildetour always is."""
        self.readonly = readonly
        if not readonly:
            make_dirs(db_path.parent)  # its name durable before the queue is (issue 10, #13)
        self.spool = Spool(spool_dir, create=not readonly)
        self._conn = connect(db_path, readonly=readonly, upgrade=upgrade)
        self._audit: AuditLog | None = None if readonly else AuditLog(audit_path)
        self._cache = BytesCache(cache_bytes, cache_seconds)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._pending: list[_Op] = []
        self._wake = asyncio.Event()
        self._writing = False  # the writer task has started
        self._dirs = (db_path.parent, spool_dir)  # where writes go: the queue's and the spool's
        self._failure: tuple[float, str] | None = None  # when and why the last transaction failed
        self._marks: list[tuple[Sequence[int], float]] = []  # attempts started, not yet queued (`started`)
        self._own_busy_handling = False  # `_begin` waits for the write lock, not SQLite's busy timeout

    def recover(self) -> None:
        """At the server's start only: half-written spool files of a crashed run, and spool
        files whose commit never happened (a crash between the two), were never acknowledged:
        remove them. (Never while a server runs: its writes in progress look just like these.)"""
        self.spool.clear_tmp()
        known = {row[0] for row in self._conn.execute("SELECT queue_id FROM messages")}
        for name in self.spool.names() - known:
            self.spool.remove(name)
        queue_sql.clear_marks(self._conn)  # no attempt of an earlier run is in flight any more

    # --- the writer -------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._writing = True  # (in the server, a writer that ends ends the server's TaskGroup)
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            results = await loop.run_in_executor(self._writer, self._apply, batch)
            for op, (ok, value) in zip(batch, results):
                if op.future.done():
                    continue
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(value)

    def health(self) -> str | None:
        """None when the store can take writes: its writer runs, the queue's and the spool's
        directories are writable and have room, and no transaction failed within the last
        `_FAILURE_SHOWN` seconds (unless one committed since); else why not, in one line
        (/readyz). Cheap: no query, no write; a few system calls."""
        if self.readonly or not self._writing:
            return "the store's writer is not running"
        failure = self._failure
        if failure is not None and time.monotonic() - failure[0] < _FAILURE_SHOWN:
            return f"the store's last write failed: {failure[1]}"
        for where in self._dirs:
            if not os.access(where, os.W_OK):
                return f"{where} is not writable"
            if os.statvfs(where).f_bavail == 0:
                return f"no space left in {where}"
        return None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SqliteStore]:
        """The store with its writer running, for a command that is not the server."""
        writer = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            writer.cancel()
            with suppress(asyncio.CancelledError):
                await writer

    def _apply(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        conn = self._conn
        try:
            if any(op.needs_spool_sync for op in batch):
                self.spool.sync()
            self._begin()
            if len(batch) == 1:  # its own transaction: a failing op rolls it back, no savepoint needed
                try:
                    results.append((True, batch[0].func(conn)))
                except Exception as exc:
                    conn.execute("ROLLBACK")
                    return [(False, exc)]
            else:
                for op in batch:
                    conn.execute("SAVEPOINT op")
                    try:
                        results.append((True, op.func(conn)))
                        conn.execute("RELEASE op")
                    except Exception as exc:  # one bad op must not sink the group
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        results.append((False, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._failure = time.monotonic(), f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            return [(False, exc) for _ in batch]
        self._failure = None
        try:
            self._log(e for op, (ok, _) in zip(batch, results) if ok for e in op.events)
        except OSError as exc:  # a full disk must not stop the writer: the database has them
            log.error("audit log not written (%s): the events are in the queue database", exc.strerror or exc)
        except Exception:  # nor a bug in the audit log
            log.exception("audit log not written: the events are in the queue database")
        return results

    def _begin(self) -> None:
        """BEGIN IMMEDIATE: take the write lock, which another process (an operator's `maildetour
        queue` command, or a second server on another state dir's copy) may hold a moment.
        SQLite's busy handler would sleep 1, 2, 5, 10 ms between tries; a transaction holds the
        lock about a millisecond (one WAL fsync), so we try again sooner (`_BUSY_FIRST` doubling
        to `_BUSY_LONGEST`), for at most `_BUSY_WAIT`, then fail the batch like any other write
        (inbound 451; delivery tries again). The writer's connection has no busy timeout of its
        own from its first transaction on: nothing else in a transaction waits for a lock."""
        conn = self._conn
        if not self._own_busy_handling:
            conn.execute("PRAGMA busy_timeout=0")
            self._own_busy_handling = True
        delay, deadline = _BUSY_FIRST, time.monotonic() + _BUSY_WAIT
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF != _SQLITE_BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, _BUSY_LONGEST)

    def _log(self, events: Any) -> None:
        assert self._audit is not None
        self._audit.write(events)

    def reopen_audit_log(self) -> None:
        """SIGHUP: the audit log was rotated; write to a new file at its path."""
        if self._audit is not None:
            self._audit.reopen()

    def _enqueue(self, func: Callable[[sqlite3.Connection], T], *, spool: bool = False,
                 events: Sequence[Event] = ()) -> asyncio.Future[T]:
        """Queue `func` for the writer's next transaction, now (ops commit in the order they
        were queued); `events` (which `func` may still append to) go to the audit log once it
        committed. The future is done when it has."""
        if self.readonly:  # no writer: read in a thread of its own
            return asyncio.ensure_future(asyncio.to_thread(func, self._conn))
        if self._marks:  # attempt marks ride with this transaction, before it (see `started`)
            self._queue_marks()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append(_Op(func, future, spool, events))
        self._wake.set()
        return future

    async def _submit(self, func: Callable[[sqlite3.Connection], T], *, spool: bool = False,
                      events: Sequence[Event] = ()) -> T:
        return await self._enqueue(func, spool=spool, events=events)

    # --- the mail's way through -------------------------------------------------------------
    async def accept(self, message: Message, data: bytes, copies: Sequence[NewCopy],
                     events: Sequence[Event]) -> list[Copy]:
        if in_database(len(data)):
            made = await self.enter(message, copies, events, data)
            self._cache.put(message.queue_id, data)
            return made
        await asyncio.to_thread(self.spool.write, message.queue_id, data)
        try:
            made = await self.enter(message, copies, events)
        except Exception:  # the insert failed: never committed; its file must not take space (a full
            # disk). Not on cancellation: the queued insert may still commit, and needs the file.
            await asyncio.to_thread(self.spool.remove, message.queue_id)
            raise
        self._cache.put(message.queue_id, data)
        return made

    async def enter(self, message: Message, copies: Sequence[NewCopy], events: Sequence[Event],
                    data: bytes | None = None) -> list[Copy]:
        """Commit the rows of a message in the writer's next transaction; the copies as
        committed. With `data` (`in_database`) its bytes go in the same transaction; without,
        they are in the spool already (`Spool.write`, by `accept` or by an SMTP intake worker,
        `intake_store`) and the spool's directory is synced before the commit."""
        logged = list(events)  # and the events of copies born final, added by `insert`

        def insert(conn: sqlite3.Connection) -> list[Copy]:
            conn.execute(
                "INSERT INTO messages (queue_id, mail_from, received_at, message_id, size, client)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (message.queue_id, message.mail_from, message.received_at, message.message_id,
                 message.size, message.client),
            )
            made = []
            for c in copies:
                cur = conn.execute(
                    "INSERT INTO copies (queue_id, recipient, target, origin, hidden_origin, state, next_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (message.queue_id, c.recipient, c.target, c.target, int(c.hidden), c.state,
                     message.received_at),
                )
                copy = Copy(
                    id=int(cur.lastrowid or 0), queue_id=message.queue_id, mail_from=message.mail_from,
                    recipient=c.recipient, target=c.target, origin=c.target, hidden=c.hidden,
                    state=c.state, attempts=0, next_at=message.received_at, first_failure=None,
                    detours=0, received_at=message.received_at, size=message.size,
                )
                made.append(copy)
                if c.state != "queued":
                    logged.append(Event(message.received_at, message.queue_id, copy.id, c.state,  # type: ignore[arg-type]
                                        c.target, c.why))
            if data is not None:
                conn.execute("INSERT INTO bodies (queue_id, data) VALUES (?, ?)", (message.queue_id, data))
            _insert_events(conn, logged)
            return made

        return await self._submit(insert, spool=data is None, events=logged)

    def update(self, copy: Copy, events: Sequence[Event]) -> Awaitable[bool]:
        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE copies SET target=?, hidden_origin=?, state=?, attempts=?, next_at=?,"
                f" first_failure=?, detours=?, attempt_started=NULL WHERE id=? AND state NOT IN {_OPERATOR_STATES}",
                (copy.target, int(copy.hidden), copy.state, copy.attempts, copy.next_at,
                 copy.first_failure, copy.detours, copy.id),
            )
            if cur.rowcount == 0:  # the operator's hand won; the attempt is over all the same
                queue_sql.clear_marks(conn, copy.id)
            _insert_events(conn, events)
            return cur.rowcount == 1

        return self._enqueue(write, events=events)

    async def claim(self, copies: Sequence[Copy], now: float) -> list[Copy]:
        """One node: every copy is this node's to attempt (no lease, no write)."""
        return list(copies)

    async def listen(self, reload: Callable[[], None], flush: Callable[[], None]) -> None:
        """One node: nobody else to hear (the operator's commands signal the server)."""
        return None

    async def unfinished(self) -> list[Copy]:
        return await self._submit(lambda conn: _copies(conn, "WHERE c.state = 'queued' ORDER BY c.next_at"))

    async def due(self, before: float, limit: int) -> DueCopies:
        """Two ranges of the `copies_due` index, in one transaction (the writer's). INDEXED BY:
        without ANALYZE's statistics SQLite prefers `copies_queued` (state = ?), then sorts all
        of them: 30 ms instead of 4 for 100,000 queued copies."""
        def read(conn: sqlite3.Connection) -> DueCopies:
            found = [_copy(r) for r in conn.execute(
                f"SELECT {_COPY_COLUMNS} FROM copies c INDEXED BY copies_due JOIN messages m USING (queue_id)"
                " WHERE c.state = 'queued' AND c.next_at < ? ORDER BY c.next_at, c.id LIMIT ?", (before, limit))]
            after = "next_at >= ?" if len(found) < limit else "next_at >= ? AND (next_at > ? OR id > ?)"
            args = (before,) if len(found) < limit else (found[-1].next_at, found[-1].next_at, found[-1].id)
            later = conn.execute(f"SELECT count(*) FROM copies INDEXED BY copies_due WHERE state = 'queued'"
                                 f" AND {after}", args).fetchone()[0]
            return DueCopies(tuple(found), int(later))

        return await self._submit(read)

    async def oldest_queued(self) -> float | None:
        """The unfinished messages oldest first (`messages_unfinished`), up to the first with a
        queued copy: usually the first one. (A copy a late bounce queued again after its message
        finished is not seen here; the scheduler holds that one in memory.)"""
        def read(conn: sqlite3.Connection) -> float | None:
            row = conn.execute("SELECT m.received_at FROM messages m WHERE m.finished = 0 AND EXISTS"
                               " (SELECT 1 FROM copies c WHERE c.queue_id = m.queue_id AND c.state = 'queued')"
                               " ORDER BY m.received_at LIMIT 1").fetchone()
            return None if row is None else float(row[0])

        return await self._submit(read)

    def remember(self, queue_id: str, data: bytes) -> None:
        """Bytes of a message `enter` committed, from the intake worker that accepted it: `read`
        then needs no trip to the spool (if they fit the cache)."""
        self._cache.put(queue_id, data)

    async def read(self, queue_id: str) -> bytes:
        """The message's bytes: from memory, the queue database or the spool (FileNotFoundError
        when they are in neither)."""
        data = self._cache.get(queue_id)
        if data is None:
            try:
                row = await self._submit(lambda conn: conn.execute(
                    "SELECT data FROM bodies WHERE queue_id=?", (queue_id,)).fetchone())
            except sqlite3.Error as exc:  # the queue database cannot be read now: try again later
                raise OSError(f"queue database: {exc}") from exc
            data = bytes(row[0]) if row is not None else await asyncio.to_thread(self.spool.read, queue_id)
            self._cache.put(queue_id, data)
        return data

    async def finish(self, queue_id: str, keep_until: float | None = None) -> None:
        self._cache.drop(queue_id)
        await self._submit(lambda conn: self._mark_finished(conn, queue_id, keep_until))

    async def finish_if_done(self, queue_id: str, keep_until: float | None = None) -> bool:
        def mark(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM copies WHERE queue_id=? AND state='queued' LIMIT 1",
                            (queue_id,)).fetchone() is not None:
                return False
            self._mark_finished(conn, queue_id, keep_until)
            return True

        done = await self._submit(mark)
        if done:
            self._cache.drop(queue_id)
        return done

    def _mark_finished(self, conn: sqlite3.Connection, queue_id: str, keep_until: float | None) -> None:
        # finished_at (retention counts from it): the time of the message's last event, its
        # last copy's outcome, on the clock of whoever wrote it.
        conn.execute("UPDATE messages SET finished=1, keep_until=?, finished_at=coalesce("
                     "(SELECT max(at) FROM events WHERE queue_id=?), received_at) WHERE queue_id=?",
                     (keep_until, queue_id, queue_id))
        if keep_until is None:
            self._remove_unless_held(conn, queue_id)

    def _remove_unless_held(self, conn: sqlite3.Connection, queue_id: str) -> None:
        """Remove the bytes unless a copy may still need them. In the writer thread: no extra
        hand-off; a crash leaves a file at most (removed as an orphan at the next start)."""
        held = conn.execute(f"SELECT 1 FROM copies WHERE queue_id=? AND state NOT IN {_FINAL} LIMIT 1",
                            (queue_id,)).fetchone()
        if held is None and not _drop_body(conn, queue_id):
            self.spool.remove(queue_id)

    async def find_copy(self, key: str, target: str) -> Copy | None:
        found = await self._submit(lambda conn: _copies(
            conn, "WHERE (m.queue_id=? OR m.message_id=?) AND lower(c.target)=? ORDER BY c.id LIMIT 1",
            (key, key, target.lower())))
        return found[0] if found else None

    async def kept(self, queue_id: str, now: float) -> bool:
        def query(conn: sqlite3.Connection) -> tuple[bool, bool]:
            row = conn.execute("SELECT finished, keep_until FROM messages WHERE queue_id=?", (queue_id,)).fetchone()
            return (row is not None and (not row[0] or (row[1] is not None and row[1] >= now)),
                    _has_body(conn, queue_id))

        kept, in_db = await self._submit(query)
        return kept and (in_db or await asyncio.to_thread(self.spool.path(queue_id).exists))

    async def purge(self, now: float) -> int:
        """In batches of `_PURGE_BATCH` messages, one short transaction each (an hour's worth
        at once would hold the writer, and so every acceptance, for seconds)."""
        def expired(conn: sqlite3.Connection) -> tuple[int, list[str], list[str]]:
            rows = conn.execute("SELECT queue_id, NOT EXISTS (SELECT 1 FROM copies c WHERE c.queue_id=m.queue_id"
                                f" AND c.state NOT IN {_FINAL}) FROM messages m WHERE keep_until < ? AND finished=1"
                                " LIMIT ?", (now, _PURGE_BATCH)).fetchall()
            conn.executemany("UPDATE messages SET keep_until=NULL WHERE queue_id=?", [(r[0],) for r in rows])
            gone = [r[0] for r in rows if r[1]]  # quarantined copies keep theirs
            return len(rows), gone, [q for q in gone if not _drop_body(conn, q)]

        removed = 0
        while True:
            seen, gone, files = await self._submit(expired)
            await self._remove_files(gone, files)
            removed += len(gone)
            if seen < _PURGE_BATCH:
                return removed
            await asyncio.sleep(0)  # others' writes go between two batches

    # --- retention (store.retention sweeps with these, one small transaction each) -----------
    async def expire_quarantined(self, before: float, now: float, limit: int) -> int:
        events: list[Event] = []

        def expire(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
            rows = conn.execute("SELECT id, queue_id, target FROM copies WHERE state = 'quarantined'"
                                " AND next_at < ? ORDER BY next_at LIMIT ?", (before, limit)).fetchall()
            conn.executemany("UPDATE copies SET state = 'deleted' WHERE id = ?", [(r[0],) for r in rows])
            events.extend(Event(now, queue_id, copy_id, "deleted", target,
                                "quarantined longer than store.quarantine_retention: deleted, never delivered")
                          for copy_id, queue_id, target in rows)
            _insert_events(conn, events)
            bare = [queue_id for queue_id in dict.fromkeys(r[1] for r in rows) if _settle_expired(conn, queue_id, now)]
            return bare, [queue_id for queue_id in bare if not _drop_body(conn, queue_id)]

        bare, files = await self._submit(expire, events=events)
        await self._remove_files(bare, files)
        return len(events)

    async def purge_finished(self, before: float, now: float, limit: int) -> int:
        nothing_left = (" AND NOT EXISTS (SELECT 1 FROM copies c WHERE c.queue_id = m.queue_id"
                        f" AND c.state NOT IN {_FINAL})")

        def purge(conn: sqlite3.Connection) -> list[str]:
            found = [r[0] for r in conn.execute(
                "SELECT queue_id FROM messages m WHERE finished = 1 AND finished_at < ?"
                f" AND (keep_until IS NULL OR keep_until < ?){nothing_left} ORDER BY finished_at LIMIT ?",
                (before, now, limit))]
            if len(found) < limit:  # never marked finished (a crash between its last update and finish)
                found += [r[0] for r in conn.execute(
                    f"SELECT queue_id FROM messages m WHERE finished = 0 AND received_at < ?{nothing_left}"
                    " ORDER BY received_at LIMIT ?", (before, limit - len(found)))]
            for table in ("events", "copies", "messages", "bodies"):
                conn.executemany(f"DELETE FROM {table} WHERE queue_id = ?", [(q,) for q in found])
            return found

        gone = await self._submit(purge)
        await self._remove_files(gone, gone)
        return len(gone)

    async def _remove_files(self, queue_ids: Sequence[str], files: Sequence[str]) -> None:
        """After a commit that removed messages' bytes: they leave the cache, and `files` (those
        kept in the spool) the disk (a crash before this leaves orphans, removed at the next
        start). The cache is the loop's: dropped here, the files off the loop."""
        for queue_id in queue_ids:
            self._cache.drop(queue_id)

        def remove() -> None:
            for queue_id in files:
                self.spool.remove(queue_id)

        if files:
            await asyncio.to_thread(remove)

    async def retention_report(self, now: float) -> RetentionReport:
        """Counts for `maildetour queue`. Reads the whole messages table once (late bounces are
        the messages without copies): about a second for a million messages."""
        def query(conn: sqlite3.Connection) -> RetentionReport:
            finished, oldest = conn.execute(
                "SELECT count(*), min(finished_at) FROM messages WHERE finished = 1").fetchone()
            kept, until = conn.execute("SELECT count(*), max(keep_until) FROM messages"
                                       " WHERE keep_until >= ? AND finished = 1", (now,)).fetchone()
            late = conn.execute("SELECT count(*) FROM messages m WHERE NOT EXISTS"
                                " (SELECT 1 FROM copies c WHERE c.queue_id = m.queue_id)").fetchone()[0]
            quarantined, since = conn.execute(
                "SELECT count(*), min(next_at) FROM copies WHERE state = 'quarantined'").fetchone()
            return RetentionReport(finished, oldest, kept, until, late, quarantined, since)

        return await self._submit(query)

    # --- the operator's view and hands ------------------------------------------------------
    async def story(self, key: str) -> Story | None:
        return await self._submit(lambda conn: _story(conn, key))

    async def copies(self, states: Sequence[CopyState] | None, limit: int) -> list[Copy]:
        where = "" if states is None else f"WHERE c.state IN ({', '.join('?' * len(states))})"
        return await self._submit(lambda conn: _copies(
            conn, f"{where} ORDER BY c.queue_id, c.id LIMIT ?", (*(states or ()), limit)))

    async def flush(self, now: float, *, queue_id: str | None = None, dest: str | None = None,
                    later_only: bool = False) -> int:
        events: list[Event] = []
        return await self._submit(lambda conn: queue_sql.flush(conn, now, queue_id, dest, events, later_only),
                                  events=events)

    async def hold(self, queue_id: str, now: float) -> int:
        return await self._operator(queue_id, now, "held", "held", "('queued')",
                                    "queued copies held by the operator")

    async def release(self, queue_id: str, now: float) -> int:
        return await self._operator(queue_id, now, "queued", "released", "('held', 'quarantined')",
                                    "held or quarantined copies queued again by the operator")

    async def delete(self, queue_id: str, now: float, *, refuse_in_flight: bool = False) -> int | InFlight:
        events: list[Event] = []

        def change(conn: sqlite3.Connection) -> int | InFlight:
            busy = queue_sql.in_flight(conn, queue_id) if refuse_in_flight else ()
            if busy:
                return InFlight(busy)
            return self._change(conn, queue_id, now, "deleted", "deleted", "('queued', 'held', 'quarantined')",
                                "copies deleted by the operator", events)

        return await self._submit(change, events=events)

    async def _operator(self, queue_id: str, now: float, state: CopyState, kind: str, from_states: str,
                        what: str) -> int:
        events: list[Event] = []
        return await self._submit(lambda conn: self._change(conn, queue_id, now, state, kind, from_states, what,
                                                            events), events=events)

    def _change(self, conn: sqlite3.Connection, queue_id: str, now: float, state: CopyState, kind: str,
                from_states: str, what: str, events: list[Event]) -> int:
        """One of the operator's changes, in the writer's transaction; `events` gets its event."""
        count = conn.execute(
            "UPDATE copies SET state=?, attempts=0, first_failure=NULL, next_at=?"
            f" WHERE queue_id=? AND state IN {from_states}", (state, now, queue_id)).rowcount
        if not count:
            return 0
        events.append(Event(now, queue_id, None, kind, "", f"{count} {what}"))  # type: ignore[arg-type]
        _insert_events(conn, events)
        if state == "queued":
            conn.execute("UPDATE messages SET finished=0, finished_at=NULL WHERE queue_id=?", (queue_id,))
        elif state == "deleted":
            conn.execute("UPDATE messages SET finished=1, keep_until=NULL, finished_at=? WHERE queue_id=?",
                         (now, queue_id))
            self._remove_unless_held(conn, queue_id)
        return count

    # --- the queue tools (issue 12): attempt marks, listing, requeue; SQL in `store.sqlite_queue`
    def started(self, copy_ids: Sequence[int], now: float) -> None:
        """The scheduler starts an attempt with these copies: mark them (queued ones only), so
        `queue delete` can refuse them. The mark rides with the next transaction, or gets one
        of its own after `_MARK_AFTER`: an attempt over sooner (most) costs no commit of its
        own, its update carries mark and clear together."""
        if not self._marks:
            asyncio.get_running_loop().call_later(_MARK_AFTER, self._queue_marks)
        self._marks.append((copy_ids, now))

    def _queue_marks(self) -> None:
        """Queue the marks held so far as one op, ahead of whatever is queued after it."""
        marks, self._marks = self._marks, []
        if not marks:
            return
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_marks_failed)
        self._pending.append(_Op(lambda conn: sum(queue_sql.mark_started(conn, ids, at) for ids, at in marks),
                                 future, False, ()))
        self._wake.set()

    async def listing(self, query: QueueQuery) -> QueueListing:
        return await self._submit(lambda conn: queue_sql.listing(conn, query, _copies))

    async def requeue(self, queue_id: str, now: float) -> int | BytesGone:
        events: list[Event] = []
        return await self._submit(lambda conn: queue_sql.requeue(
            conn, queue_id, now, lambda q: _has_body(conn, q) or self.spool.path(q).exists(), events),
            events=events)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._conn.close()
        if self._audit is not None:
            self._audit.close()


def _settle_expired(conn: sqlite3.Connection, queue_id: str, now: float) -> bool:
    """A message lost a quarantined copy to retention: when nothing is left to deliver it is
    finished now (kept `retention` from now for `trace`). True when its bytes may go now (not
    kept for late bounces any more)."""
    if conn.execute(f"SELECT 1 FROM copies WHERE queue_id = ? AND state NOT IN {_FINAL} LIMIT 1",
                    (queue_id,)).fetchone() is not None:
        return False
    conn.execute("UPDATE messages SET finished = 1, finished_at = ? WHERE queue_id = ?", (now, queue_id))
    row = conn.execute("SELECT keep_until FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    return row is not None and (row[0] is None or row[0] < now)


def _marks_failed(marked: asyncio.Future[int]) -> None:
    """Marks that did not commit cost only `queue delete`'s refusal during those attempts."""
    if not marked.cancelled() and marked.exception() is not None:
        log.warning("attempts not marked in flight: %s", marked.exception())


def _has_body(conn: sqlite3.Connection, queue_id: str) -> bool:
    return conn.execute("SELECT 1 FROM bodies WHERE queue_id=?", (queue_id,)).fetchone() is not None


def _drop_body(conn: sqlite3.Connection, queue_id: str) -> bool:
    """Remove the message's bytes from the queue database; False when they were not there (in
    the spool, whose file the caller removes once this transaction committed)."""
    return conn.execute("DELETE FROM bodies WHERE queue_id=?", (queue_id,)).rowcount > 0


def _insert_events(conn: sqlite3.Connection, events: Sequence[Event]) -> None:
    conn.executemany(
        "INSERT INTO events (queue_id, copy_id, at, kind, target, detail) VALUES (?,?,?,?,?,?)",
        [(e.queue_id, e.copy_id, e.at, e.kind, e.target, e.detail) for e in events],
    )


def _copies(conn: sqlite3.Connection, where: str, args: Sequence[Any] = ()) -> list[Copy]:
    return [_copy(r) for r in conn.execute(
        f"SELECT {_COPY_COLUMNS} FROM copies c JOIN messages m USING (queue_id) {where}", args)]


def _story(conn: sqlite3.Connection, key: str) -> Story | None:
    """A message by queue id, or by Message-ID (with or without angle brackets)."""
    row = conn.execute(
        "SELECT queue_id, mail_from, received_at, message_id, size, client FROM messages"
        " WHERE queue_id=? OR message_id=? OR message_id=? ORDER BY received_at LIMIT 1",
        (key, key, f"<{key.strip('<>')}>"),
    ).fetchone()
    if row is None:
        return None
    message = Message(*row)
    copies = tuple(_copies(conn, "WHERE c.queue_id=? ORDER BY c.id", (message.queue_id,)))
    events = tuple(Event(at=r[0], queue_id=message.queue_id, copy_id=r[1], kind=r[2], target=r[3],
                         detail=r[4]) for r in conn.execute(
        "SELECT at, copy_id, kind, target, detail FROM events WHERE queue_id=? ORDER BY id",
        (message.queue_id,)))
    return Story(message, copies, events)


__all__ = ["SqliteStore", "connect"]
