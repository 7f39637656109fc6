"""The embedded store: SQLite (WAL, synchronous=FULL) for the queue, spool files for the bytes.

Internal. One writer thread does every write; writes that arrive while it is busy are grouped
into one transaction (group commit: one fsync of the spool directory and one WAL fsync for many
messages), and none is acknowledged before its own commit. Events are appended to the JSON-lines
audit log after they commit. Fails with OSError/sqlite3.Error to the caller (inbound answers
451; delivery keeps the copy in memory and retries).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO, TypeVar

from maildetour.store.records import Copy, Event, MessageInfo, NewCopy, NewMessage, Story
from maildetour.store.spool import Spool

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    mail_from TEXT NOT NULL,
    received_at REAL NOT NULL,
    message_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    client TEXT NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    keep_until REAL
);
CREATE INDEX IF NOT EXISTS messages_message_id ON messages(message_id);
CREATE TABLE IF NOT EXISTS copies (
    id INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL REFERENCES messages(queue_id),
    recipient TEXT NOT NULL,
    target TEXT NOT NULL,
    hidden_origin INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    first_failure REAL,
    detours INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS copies_queued ON copies(state) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS copies_queue_id ON copies(queue_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL,
    copy_id INTEGER,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_queue_id ON events(queue_id);
"""

_COPY_COLUMNS = (
    "c.id, c.queue_id, m.mail_from, c.recipient, c.target, c.hidden_origin, c.state, c.attempts,"
    " c.next_at, c.first_failure, c.detours, m.received_at"
)


def _copy(row: Sequence[Any]) -> Copy:
    return Copy(
        id=row[0], queue_id=row[1], mail_from=row[2], recipient=row[3], target=row[4],
        hidden_origin=bool(row[5]), state=row[6], attempts=row[7], next_at=row[8],
        first_failure=row[9], detours=row[10], received_at=row[11],
    )


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL would skip the fsync at commit in WAL mode: FULL keeps the 250 promise.
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class _Op:
    __slots__ = ("func", "future", "needs_spool_sync", "events")

    def __init__(self, func: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any],
                 needs_spool_sync: bool, events: Sequence[Event]) -> None:
        self.func, self.future = func, future
        self.needs_spool_sync, self.events = needs_spool_sync, events


class SqliteStore:
    def __init__(self, db_path: Path, spool_dir: Path, audit_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spool = Spool(spool_dir)
        self.spool.clear_tmp()
        self._conn = connect(db_path)
        self._remove_orphans()
        self._audit: TextIO = open(audit_path, "a", encoding="utf-8")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._pending: list[_Op] = []
        self._wake = asyncio.Event()

    def _remove_orphans(self) -> None:
        """Spool files whose commit never happened (a crash between the two) were never
        acknowledged: remove them at start-up."""
        known = {row[0] for row in self._conn.execute("SELECT queue_id FROM messages")}
        for name in self.spool.names() - known:
            self.spool.remove(name)

    # --- the writer -------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
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

    def _apply(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        try:
            if any(op.needs_spool_sync for op in batch):
                self.spool.sync()
            self._conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                self._conn.execute("SAVEPOINT op")
                try:
                    results.append((True, op.func(self._conn)))
                    self._conn.execute("RELEASE op")
                except Exception as exc:  # one bad op must not sink the group
                    self._conn.execute("ROLLBACK TO op")
                    self._conn.execute("RELEASE op")
                    results.append((False, exc))
            self._conn.execute("COMMIT")
        except Exception as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            return [(False, exc) for _ in batch]
        self._log(e for op, (ok, _) in zip(batch, results) if ok for e in op.events)
        return results

    def _log(self, events: Any) -> None:
        for e in events:
            self._audit.write(json.dumps({
                "at": round(e.at, 6), "queue_id": e.queue_id, "copy": e.copy_id,
                "event": e.kind, "target": e.target, "detail": e.detail,
            }) + "\n")
        self._audit.flush()

    async def _submit(self, func: Callable[[sqlite3.Connection], T], *, spool: bool = False,
                      events: Sequence[Event] = ()) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append(_Op(func, future, spool, events))
        self._wake.set()
        return await future

    # --- the Store protocol -----------------------------------------------------------------
    async def accept(self, message: NewMessage, data: bytes, copies: Sequence[NewCopy],
                     events: Sequence[Event]) -> list[Copy]:
        await asyncio.to_thread(self.spool.write, message.queue_id, data)

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
                    "INSERT INTO copies (queue_id, recipient, target, hidden_origin, state, next_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (message.queue_id, c.recipient, c.target, int(c.hidden_origin), c.state,
                     message.received_at),
                )
                made.append(Copy(
                    id=int(cur.lastrowid or 0), queue_id=message.queue_id, mail_from=message.mail_from,
                    recipient=c.recipient, target=c.target, hidden_origin=c.hidden_origin,
                    state=c.state, attempts=0, next_at=message.received_at, first_failure=None,
                    detours=0, received_at=message.received_at,
                ))
            _insert_events(conn, events, made)
            return made

        return await self._submit(insert, spool=True, events=events)

    async def update(self, copy: Copy, events: Sequence[Event]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE copies SET target=?, state=?, attempts=?, next_at=?, first_failure=?,"
                " detours=? WHERE id=?",
                (copy.target, copy.state, copy.attempts, copy.next_at, copy.first_failure,
                 copy.detours, copy.id),
            )
            _insert_events(conn, events, [])

        await self._submit(write, events=events)

    async def unfinished(self) -> list[Copy]:
        def query(conn: sqlite3.Connection) -> list[Copy]:
            rows = conn.execute(
                f"SELECT {_COPY_COLUMNS} FROM copies c JOIN messages m USING (queue_id)"
                " WHERE c.state = 'queued' ORDER BY c.next_at"
            ).fetchall()
            return [_copy(r) for r in rows]

        return await self._submit(query)

    async def read(self, queue_id: str) -> bytes:
        return await asyncio.to_thread(self.spool.read, queue_id)

    async def finish(self, queue_id: str, keep_until: float | None = None) -> None:
        def mark(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE messages SET finished=1, keep_until=? WHERE queue_id=?",
                         (keep_until, queue_id))
            if keep_until is not None:
                return
            held = conn.execute(
                "SELECT 1 FROM copies WHERE queue_id=? AND state IN ('queued','quarantined') LIMIT 1",
                (queue_id,),
            ).fetchone()
            if held is None:  # in the writer thread: no extra hand-off; a crash leaves a file at most
                self.spool.remove(queue_id)

        await self._submit(mark)

    async def find_copy(self, key: str, target: str) -> Copy | None:
        def query(conn: sqlite3.Connection) -> Copy | None:
            row = conn.execute(
                f"SELECT {_COPY_COLUMNS} FROM copies c JOIN messages m USING (queue_id)"
                " WHERE (m.queue_id=? OR m.message_id=?) AND lower(c.target)=? ORDER BY c.id LIMIT 1",
                (key, key, target.lower())).fetchone()
            return _copy(row) if row else None

        return await self._submit(query)

    async def kept(self, queue_id: str, now: float) -> bool:
        def query(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT finished, keep_until FROM messages WHERE queue_id=?", (queue_id,)).fetchone()
            return row is not None and (not row[0] or (row[1] is not None and row[1] >= now))

        return await self._submit(query) and await asyncio.to_thread(self.spool.path(queue_id).exists)

    async def purge(self, now: float) -> int:
        def expired(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT queue_id FROM messages WHERE finished=1 AND keep_until < ?"
                                " AND NOT EXISTS (SELECT 1 FROM copies c WHERE c.queue_id=messages.queue_id"
                                " AND c.state IN ('queued','quarantined'))", (now,)).fetchall()
            conn.execute("UPDATE messages SET keep_until=NULL WHERE finished=1 AND keep_until < ?", (now,))
            return [r[0] for r in rows]

        gone = await self._submit(expired)
        for queue_id in gone:
            await asyncio.to_thread(self.spool.remove, queue_id)
        return len(gone)

    async def story(self, key: str) -> Story | None:
        return await self._submit(lambda conn: read_story(conn, key))

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._conn.close()
        self._audit.close()


def _insert_events(conn: sqlite3.Connection, events: Sequence[Event], made: Sequence[Copy]) -> None:
    """Insert events; an event with copy_id -1-i refers to the i-th copy just made."""
    for e in events:
        copy_id = e.copy_id
        if copy_id is not None and copy_id < 0 and made:
            copy_id = made[-copy_id - 1].id
        conn.execute(
            "INSERT INTO events (queue_id, copy_id, at, kind, target, detail) VALUES (?,?,?,?,?,?)",
            (e.queue_id, copy_id, e.at, e.kind, e.target, e.detail),
        )


def read_story(conn: sqlite3.Connection, key: str) -> Story | None:
    """A message by queue id, or by Message-ID (with or without angle brackets)."""
    row = conn.execute(
        "SELECT queue_id, mail_from, received_at, message_id, size, client FROM messages"
        " WHERE queue_id=? OR message_id=? OR message_id=? ORDER BY received_at LIMIT 1",
        (key, key, f"<{key.strip('<>')}>"),
    ).fetchone()
    if row is None:
        return None
    message = MessageInfo(*row)
    copies = tuple(_copy(r) for r in conn.execute(
        f"SELECT {_COPY_COLUMNS} FROM copies c JOIN messages m USING (queue_id)"
        " WHERE c.queue_id=? ORDER BY c.id", (message.queue_id,)))
    events = tuple(Event(at=r[0], queue_id=message.queue_id, copy_id=r[1], kind=r[2], target=r[3],
                         detail=r[4]) for r in conn.execute(
        "SELECT at, copy_id, kind, target, detail FROM events WHERE queue_id=? ORDER BY id",
        (message.queue_id,)))
    return Story(message, copies, events)


__all__ = ["SqliteStore", "connect", "read_story"]
