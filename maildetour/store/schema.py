"""The queue database's schema: its versions, the migrations between them, and opening it.

What: `VERSION` is the schema this maildetour writes; `MIGRATIONS` the ordered steps from an
empty file to it (a new database runs them all, so there is one source for the schema). The
version is kept in SQLite's `PRAGMA user_version`; databases from before it was kept say 0 and
are recognised by their columns (1: the first release; 2: copies.origin). `open_database`
connects and, for the server, upgrades an older database in place: first a copy of it beside
it, `queue.sqlite3.v<N>.bak` (SQLite's online backup API, fsync'ed), then every missing step
and the new version in one transaction, so a failed upgrade leaves the old database as it was.

Contract: a migration only adds (columns that may be NULL, indexes, tables) and fills what it
added; it never drops or renames, so the copy beside it is the way back. A database from a
newer maildetour is refused before anything is written (`SchemaTooNew`), and the operator's
commands (which may run beside an older server) do not upgrade: they refuse an older database
(`SchemaTooOld`: "start `maildetour serve` once") until `serve` has upgraded it; only copies
(`maildetour backup`) and `check` read any older version.

Exposure: internal; paths are the operator's. Failure: SchemaTooNew / SchemaTooOld (OSErrors
naming the file, printed on one line by the command line, exit 1); OSError and sqlite3.Error
from the files. Blocking (start-up and commands only).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from maildetour.durable import fsync_dir

log = logging.getLogger("maildetour.store")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int  # the schema version once it ran
    what: str
    statements: tuple[str, ...]  # run one by one inside the upgrade's transaction


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the first release: messages, copies, events", (
        """CREATE TABLE messages (
            queue_id TEXT PRIMARY KEY,
            mail_from TEXT NOT NULL,
            received_at REAL NOT NULL,
            message_id TEXT NOT NULL,
            size INTEGER NOT NULL,
            client TEXT NOT NULL,
            finished INTEGER NOT NULL DEFAULT 0,
            keep_until REAL
        )""",
        "CREATE INDEX messages_message_id ON messages(message_id)",
        """CREATE TABLE copies (
            id INTEGER PRIMARY KEY,
            queue_id TEXT NOT NULL REFERENCES messages(queue_id),
            recipient TEXT NOT NULL,
            target TEXT NOT NULL,
            hidden_origin INTEGER NOT NULL,  -- the copy has passed a hidden destination
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL,  -- quarantined: when it was last due, i.e. quarantined
            first_failure REAL,
            detours INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX copies_queued ON copies(state) WHERE state = 'queued'",
        "CREATE INDEX copies_queue_id ON copies(queue_id)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            queue_id TEXT NOT NULL,
            copy_id INTEGER,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            target TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
        "CREATE INDEX events_queue_id ON events(queue_id)",
    )),
    # The target a copy started at (detour chains). NULL in copies written before: read as the
    # target (`coalesce(origin, target)`), which is what it meant then.
    Migration(2, "copies.origin", ("ALTER TABLE copies ADD COLUMN origin TEXT",)),
    # Retention: when a message's last copy became final (the time of its last event), and the
    # indexes the sweep walks in small batches without reading the whole table.
    Migration(3, "messages.finished_at and the retention indexes", (
        "ALTER TABLE messages ADD COLUMN finished_at REAL",
        "UPDATE messages SET finished_at = coalesce((SELECT max(e.at) FROM events e"
        " WHERE e.queue_id = messages.queue_id), received_at) WHERE finished = 1",
        "CREATE INDEX messages_finished ON messages(finished_at) WHERE finished = 1",
        "CREATE INDEX messages_unfinished ON messages(received_at) WHERE finished = 0",
        "CREATE INDEX messages_kept ON messages(keep_until) WHERE keep_until IS NOT NULL",
        "CREATE INDEX copies_quarantined ON copies(next_at) WHERE state = 'quarantined'",
    )),
    # Queue tools (issue 12): when the attempt a copy is in started (the scheduler's mark; NULL
    # when it is in none), so `maildetour queue delete` can refuse a copy in flight.
    Migration(4, "copies.attempt_started", (
        "ALTER TABLE copies ADD COLUMN attempt_started REAL",
        "CREATE INDEX copies_in_flight ON copies(id) WHERE attempt_started IS NOT NULL",
    )),
    # Memory (issue 13): the scheduler holds only the copies due soon and asks the store for
    # the next ones by due time (then id: the index carries the rowid), however long the queue.
    Migration(5, "the index of queued copies by due time", (
        "CREATE INDEX copies_due ON copies(next_at) WHERE state = 'queued'",
    )),
    # CPU per message (issue 13): a message up to `sqlite.IN_DATABASE` bytes keeps its bytes
    # here, committed with its rows (one fsync, no spool file to make, fsync and unlink); a
    # larger one, or one accepted before, has them in the spool as before.
    Migration(6, "the bytes of small messages in the queue database", (
        "CREATE TABLE bodies (queue_id TEXT PRIMARY KEY, data BLOB NOT NULL)",
    )),
)
VERSION = MIGRATIONS[-1].version
# How long a statement waits for a lock another connection holds (the server's writer, an
# intake worker's, a backup) before SQLITE_BUSY.
BUSY_TIMEOUT_MS = 5000


class SchemaTooNew(OSError):
    """The database was written by a newer maildetour: nothing here may touch it."""

    def __init__(self, path: Path, found: int) -> None:
        super().__init__(errno.EPROTO, f"queue database has schema version {found}, newer than this "
                         f"maildetour's {VERSION}: run the newer maildetour, or restore a backup", str(path))
        self.found = found


class SchemaTooOld(OSError):
    """An operator's command may not upgrade a database a running older server may be using."""

    def __init__(self, path: Path, found: int) -> None:
        super().__init__(errno.EPROTO, f"queue database has schema version {found}, older than this "
                         f"maildetour's {VERSION}: start `maildetour serve` once to upgrade it", str(path))
        self.found = found


def read_version(conn: sqlite3.Connection) -> int:
    """The schema version of an open database: 0 for an empty one."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version:
        return version
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "messages" not in tables:
        return 0
    columns = {row[1] for row in conn.execute("PRAGMA table_info(copies)")}
    return 2 if "origin" in columns else 1


def open_database(path: Path, *, readonly: bool = False, upgrade: bool = True,
                  any_older: bool = False) -> sqlite3.Connection:
    """Connect to the queue database at `path` (autocommit: the caller runs its transactions).
    Writable: a new database gets the whole schema; an older one is upgraded when `upgrade`
    (the server), else refused (the operator's commands). Read-only: our version only (the
    store's queries are written for it), or, with `any_older`, any up to ours (copies, checks)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        found = read_version(conn)
        if found > VERSION:
            raise SchemaTooNew(path, found)
        if readonly and 0 < found < VERSION and not any_older:
            raise SchemaTooOld(path, found)
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL would skip the fsync at commit in WAL mode: FULL keeps the 250 promise.
            conn.execute("PRAGMA synchronous=FULL")
            if found < VERSION:
                if found and not upgrade:
                    raise SchemaTooOld(path, found)
                _upgrade(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _upgrade(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")  # and read the version again: another process may have done it
    try:
        found = read_version(conn)
        if found > 0 and found < VERSION:
            # Copied while this transaction holds the write lock, so nothing changes meanwhile
            # (through a second connection: the backup API cannot read from one that writes).
            reader = sqlite3.connect(path)
            try:
                copy_database(reader, backup_path(path, found))
            finally:
                reader.close()
        for step in MIGRATIONS[found:]:
            for statement in step.statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if found:
        log.info("%s: schema upgraded from version %d to %d; the old database is kept as %s",
                 path, found, VERSION, backup_path(path, found).name)


def backup_path(path: Path, version: int) -> Path:
    """Where the copy of a database of schema `version` goes before it is upgraded."""
    return path.with_name(f"{path.name}.v{version}.bak")


def copy_database(conn: sqlite3.Connection, dest: Path) -> None:
    """A consistent copy of `conn`'s database at `dest` (SQLite's online backup API: safe while
    others write), in one file (rollback journal mode), fsync'ed and renamed into place; an older
    `dest` is replaced."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    target = sqlite3.connect(tmp)
    try:
        conn.backup(target)
        # One file that stands alone (no -wal beside it to lose); `serve` makes it WAL again.
        target.execute("PRAGMA journal_mode=DELETE")
    finally:
        target.close()
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def describe(path: Path) -> str:
    """One line for `maildetour check`: the database's schema version, and what `serve` will do."""
    if not path.exists():
        return f"queue: {path} not made yet (schema version {VERSION} at the first start)"
    try:
        conn = open_database(path, readonly=True, any_older=True)  # raises SchemaTooNew
        try:
            found = read_version(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:  # damaged, foreign, or not ours to read: `serve` would fail too
        raise OSError(errno.EIO, f"cannot read the queue database: {exc}", str(path)) from None
    if found == VERSION:
        return f"queue: {path}: schema version {VERSION}"
    if found == 0:
        return f"queue: {path} is empty (schema version {VERSION} at start)"
    return (f"queue: {path}: schema version {found}; will be upgraded to {VERSION} at start"
            f" (a copy is kept as {backup_path(path, found).name})")
