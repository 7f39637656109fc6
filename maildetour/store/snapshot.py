"""The queue database's part of a backup: a consistent copy while the server runs, what the
copy needs from the spool, and the check of a restored queue.

What: `take` copies the live database with SQLite's online backup API (a snapshot of one
moment; the server keeps writing). `wanted_bytes` says which spool files the copy refers to:
those of messages with copies still to deliver (required) and those kept for late bounces —
less the small messages whose bytes the database itself holds (`bodies`, schema 6).
A message can finish on the live server between the snapshot and the copy of its spool file,
and the server then removes the file: `settle` writes that message's later, final rows from the
live database into the copy (each message's rows stay one state it really was in), so the copy
never has a copy to deliver without its bytes. `missing_bytes` lists the messages of a restored
queue that have copies to deliver and no spool file; `counts` summarises a database.

Exposure: internal; paths are the operator's. Blocking (the `backup` and `restore` commands).
Failure: OSError, sqlite3.Error; SchemaTooNew for a database from a newer maildetour.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from maildetour.store.records import FINAL_STATES
from maildetour.store.schema import copy_database, open_database, read_version

_FINAL = "(" + ", ".join(f"'{s}'" for s in FINAL_STATES) + ")"


@dataclass(frozen=True, slots=True)
class Counts:
    schema: int
    messages: int
    events: int
    copies: dict[str, int]  # by state


@dataclass(frozen=True, slots=True)
class Wanted:
    required: frozenset[str]  # messages with copies to deliver (queued, held, quarantined)
    kept: frozenset[str]  # others whose bytes are kept: for late bounces, or not yet finished


def take(live: Path, dest: Path) -> None:
    """A consistent copy of the queue database `live` at `dest`, safe while the server writes."""
    conn = open_database(live, readonly=True, any_older=True)
    try:
        copy_database(conn, dest)
    finally:
        conn.close()


def wanted_bytes(db: Path) -> Wanted:
    conn = open_database(db, readonly=True, any_older=True)
    try:
        required = {r[0] for r in conn.execute(f"SELECT DISTINCT queue_id FROM copies WHERE state NOT IN {_FINAL}")}
        kept = {r[0] for r in conn.execute("SELECT queue_id FROM messages WHERE keep_until IS NOT NULL"
                                           " OR finished = 0")}
        in_db = _in_database(conn)  # their bytes are in the queue database itself
        return Wanted(frozenset(required - in_db), frozenset(kept - required - in_db))
    finally:
        conn.close()


def _in_database(conn: sqlite3.Connection) -> set[str]:
    """Messages whose bytes the queue database holds (schema 6 on: `bodies`)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='bodies'").fetchone() is None:
        return set()
    return {r[0] for r in conn.execute("SELECT queue_id FROM bodies")}


def settle(copy: Path, live: Path, queue_ids: Iterable[str]) -> list[str]:
    """For each message of `queue_ids` (bytes required by `copy`, gone from the spool) that has
    nothing left to deliver in the `live` database now: its rows there replace those in `copy`
    (its bytes were removed because it finished). Returns the messages settled; the others
    really miss their bytes."""
    conn = sqlite3.connect(copy, isolation_level=None, uri=True)
    try:
        conn.execute("ATTACH DATABASE ? AS live", (f"file:{live}?mode=ro",))
        if read_version(conn) != conn.execute("PRAGMA live.user_version").fetchone()[0]:
            return []  # the live queue was upgraded meanwhile: its rows do not fit
        settled = []
        conn.execute("BEGIN IMMEDIATE")
        for queue_id in queue_ids:
            known = conn.execute("SELECT 1 FROM live.messages WHERE queue_id = ?", (queue_id,)).fetchone()
            busy = conn.execute(f"SELECT 1 FROM live.copies WHERE queue_id = ? AND state NOT IN {_FINAL}",
                                (queue_id,)).fetchone()
            if known is None or busy is not None:
                continue
            for table in ("messages", "copies", "events"):
                conn.execute(f"DELETE FROM {table} WHERE queue_id = ?", (queue_id,))
                conn.execute(f"INSERT INTO {table} SELECT * FROM live.{table} WHERE queue_id = ?", (queue_id,))
            conn.execute("UPDATE messages SET keep_until = NULL WHERE queue_id = ?", (queue_id,))
            settled.append(queue_id)
        conn.execute("COMMIT")
        return settled
    finally:
        conn.close()


def missing_bytes(db: Path, spool: Path) -> list[str]:
    """Messages of the queue `db` with copies to deliver whose spool file is not in `spool`."""
    wanted = wanted_bytes(db)
    return sorted(q for q in wanted.required if not (spool / q).is_file())


def counts(db: Path) -> Counts:
    conn = open_database(db, readonly=True, any_older=True)
    try:
        by_state = {state: n for state, n in conn.execute("SELECT state, count(*) FROM copies GROUP BY state")}
        return Counts(schema=read_version(conn),
                      messages=conn.execute("SELECT count(*) FROM messages").fetchone()[0],
                      events=conn.execute("SELECT count(*) FROM events").fetchone()[0],
                      copies=dict(sorted(by_state.items())))
    finally:
        conn.close()
