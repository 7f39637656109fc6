"""The SQL of the operator's queue tools, for `store.sqlite`: listing, flushing chosen copies,
requeueing, and the marks of attempts in flight.

Internal: plain functions on a connection, run by `SqliteStore` in its writer's transaction (or,
for a read-only store, in a read transaction of their own, so totals and rows agree). Nothing
else outside `store/` sees this SQL. Failure: sqlite3.Error to the caller.

Attempt marks: the scheduler marks the copies of each attempt when it starts (`mark_started`,
only copies still queued; `SqliteStore.started` writes it with the next transaction, or within
`_MARK_AFTER`) and `update` clears the mark with the attempt's result; the server's start
clears every mark (what was in flight then is simply due again). A mark is the store's word
that a copy is in an attempt now, as long as a server runs on the queue.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from maildetour.store.listing import (
    REPLY_KINDS,
    BytesGone,
    ListedCopy,
    ListedMessage,
    QueueListing,
    QueueQuery,
)
from maildetour.store.records import FINAL_STATES, Copy, Event, Message

# `store.sqlite._copies`: copies (joined with their message) for a WHERE clause.
CopiesQuery = Callable[[sqlite3.Connection, str, Sequence[Any]], list[Copy]]

# What `requeue` takes: copies that ended without reaching anyone, or wait for the operator.
REQUEUE_STATES = ("quarantined", "bounced", "failed")


def dest_clause(dest: str) -> tuple[str, list[Any]]:
    """`--dest`: an address or `imap:NAME` matches copies going there (any case); a domain
    (`gmail.com` or `@gmail.com`) matches copies to any address at it."""
    wanted = dest.strip().lower()
    if "@" in wanted.lstrip("@") or wanted.startswith("imap:"):
        return "lower(c.target) = ?", [wanted]
    domain = wanted.lstrip("@").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "lower(c.target) LIKE ? ESCAPE '\\'", ["%@" + domain]


def _where(query: QueueQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if query.states is not None:
        clauses.append(f"c.state IN ({', '.join('?' * len(query.states))})" if query.states else "0")
        args += query.states
    if query.dest:
        clause, more = dest_clause(query.dest)
        clauses.append(clause)
        args += more
    if query.received_before is not None:
        clauses.append("m.received_at < ?")
        args.append(query.received_before)
    return " AND ".join(clauses) or "1", args


def listing(conn: sqlite3.Connection, query: QueueQuery, copies: CopiesQuery) -> QueueListing:
    if conn.in_transaction:
        return _listing(conn, query, copies)
    conn.execute("BEGIN")  # one snapshot: the totals and the rows agree
    try:
        return _listing(conn, query, copies)
    finally:
        conn.execute("COMMIT")


def _listing(conn: sqlite3.Connection, query: QueueQuery, copies: CopiesQuery) -> QueueListing:
    where, args = _where(query)
    matched = (f"WITH matched AS (SELECT m.queue_id, m.received_at, m.size, count(*) AS n FROM copies c"
               f" JOIN messages m USING (queue_id) WHERE {where} GROUP BY m.queue_id)")
    total_messages, total_copies, total_bytes = conn.execute(
        f"{matched} SELECT count(*), coalesce(sum(n), 0), coalesce(sum(size), 0) FROM matched", args).fetchone()
    order = "DESC" if query.newest_first else "ASC"
    ids = [r[0] for r in conn.execute(
        f"{matched} SELECT queue_id FROM matched ORDER BY received_at {order}, queue_id {order} LIMIT ?",
        (*args, max(query.limit, 0)))]
    shown = json.dumps(ids)
    in_shown = "IN (SELECT value FROM json_each(?))"
    found = copies(conn, f"WHERE {where} AND c.queue_id {in_shown} ORDER BY c.id", (*args, shown))
    messages = {r[0]: Message(*r) for r in conn.execute(
        "SELECT queue_id, mail_from, received_at, message_id, size, client FROM messages"
        f" WHERE queue_id {in_shown}", (shown,))}
    marks: dict[int, float] = {}
    if "attempt_started" in {r[1] for r in conn.execute("PRAGMA table_info(copies)")}:  # (read beside an older server)
        marks = dict(conn.execute(
            f"SELECT id, attempt_started FROM copies WHERE queue_id {in_shown} AND attempt_started IS NOT NULL",
            (shown,)).fetchall())
    replies = {r[0]: Event(at=r[1], queue_id=r[2], copy_id=r[0], kind=r[3], target=r[4], detail=r[5])
               for r in conn.execute(
        "SELECT copy_id, at, queue_id, kind, target, detail FROM events WHERE id IN"
        f" (SELECT max(id) FROM events WHERE queue_id {in_shown} AND copy_id IS NOT NULL"
        f" AND kind IN ({', '.join('?' * len(REPLY_KINDS))}) GROUP BY copy_id)", (shown, *REPLY_KINDS))}
    by_message: dict[str, list[ListedCopy]] = {}
    for c in found:
        by_message.setdefault(c.queue_id, []).append(ListedCopy(c, replies.get(c.id), marks.get(c.id)))
    listed = tuple(ListedMessage(messages[q], tuple(by_message.get(q, ()))) for q in ids)
    return QueueListing(listed, total_messages, total_copies, total_bytes)


def mark_started(conn: sqlite3.Connection, copy_ids: Sequence[int], now: float) -> int:
    """The scheduler started an attempt with these copies (only those still queued are marked:
    one the operator held or deleted meanwhile is not)."""
    return conn.execute(
        "UPDATE copies SET attempt_started=? WHERE state='queued' AND id IN (SELECT value FROM json_each(?))",
        (now, json.dumps(list(copy_ids)))).rowcount


def clear_marks(conn: sqlite3.Connection, copy_id: int | None = None) -> None:
    """The attempt is over (one copy's), or the server starts (every mark: nothing is in flight)."""
    if copy_id is None:
        conn.execute("UPDATE copies SET attempt_started=NULL WHERE attempt_started IS NOT NULL")
    else:
        conn.execute("UPDATE copies SET attempt_started=NULL WHERE id=? AND attempt_started IS NOT NULL", (copy_id,))


def in_flight(conn: sqlite3.Connection, queue_id: str) -> tuple[int, ...]:
    """Copies of the message that an attempt has marked and not yet reported on."""
    return tuple(r[0] for r in conn.execute(
        "SELECT id FROM copies WHERE queue_id=? AND attempt_started IS NOT NULL ORDER BY id", (queue_id,)))


def flush(conn: sqlite3.Connection, now: float, queue_id: str | None, dest: str | None,
          events: list[Event], later_only: bool = False) -> int:
    """Queued copies (of `queue_id`, going to `dest`; None: any; with `later_only`, due after
    `now`) are due at `now`; one "flushed" event per message says how many of its copies."""
    clauses: list[str] = ["c.state = 'queued'"]
    args: list[object] = []
    if later_only:
        clauses.append("c.next_at > ?")
        args.append(now)
    if queue_id is not None:
        clauses.append("c.queue_id = ?")
        args.append(queue_id)
    if dest is not None:
        clause, more = dest_clause(dest)
        clauses.append(clause)
        args += more
    where = " AND ".join(clauses)
    counts = conn.execute(f"SELECT c.queue_id, count(*) FROM copies c WHERE {where} GROUP BY c.queue_id"
                          " ORDER BY c.queue_id", args).fetchall()
    if not counts:
        return 0
    conn.execute(f"UPDATE copies AS c SET next_at = ? WHERE {where}", (now, *args))
    to = f" to {dest}" if dest is not None else ""
    events += [Event(now, q, None, "flushed", "",
                     f"{n} queued cop{'y' if n == 1 else 'ies'}{to} due now, by the operator") for q, n in counts]
    _insert_events(conn, events)
    return sum(n for _, n in counts)


def requeue(conn: sqlite3.Connection, queue_id: str, now: float, spooled: Callable[[str], bool],
            events: list[Event]) -> int | BytesGone:
    """Quarantined, bounced and failed copies of `queue_id` are queued again at their origin
    (the first target of their chain), due now, with attempts, failure clock and detours reset;
    "hidden" stays as it was (a copy that passed a hidden destination keeps its silence). One
    "requeued" event per copy. BytesGone when the message's bytes were already let go."""
    chosen = conn.execute(
        "SELECT id, target, coalesce(origin, target), state FROM copies WHERE queue_id=?"
        f" AND state IN ({', '.join('?' * len(REQUEUE_STATES))}) ORDER BY id", (queue_id, *REQUEUE_STATES)).fetchall()
    if not chosen:
        return 0
    # Bytes that are let go (finish, purge) go in the transaction that says so, or right after
    # it: a message none of whose copies needs them, finished and not kept for late bounces.
    kept = conn.execute(
        "SELECT 1 FROM messages m WHERE queue_id=? AND (finished=0 OR keep_until IS NOT NULL OR EXISTS"
        " (SELECT 1 FROM copies c WHERE c.queue_id=m.queue_id AND c.state NOT IN"
        f" ({', '.join('?' * len(FINAL_STATES))})))", (queue_id, *FINAL_STATES)).fetchone()
    if kept is None or not spooled(queue_id):
        return BytesGone()
    conn.executemany(
        "UPDATE copies SET state='queued', target=coalesce(origin, target), attempts=0, first_failure=NULL,"
        " detours=0, next_at=?, attempt_started=NULL WHERE id=?", [(now, copy_id) for copy_id, *_ in chosen])
    # Not finished any more: its bytes stay until its copies are final again (and `purge` passes it by).
    conn.execute("UPDATE messages SET finished=0, keep_until=NULL, finished_at=NULL WHERE queue_id=?", (queue_id,))
    events += [Event(now, queue_id, copy_id, "requeued", origin,
                     f"{state} at {target}: queued again at its first target, attempts reset, by the operator")
               for copy_id, target, origin, state in chosen]
    _insert_events(conn, events)
    return len(chosen)


def _insert_events(conn: sqlite3.Connection, events: Sequence[Event]) -> None:
    conn.executemany("INSERT INTO events (queue_id, copy_id, at, kind, target, detail) VALUES (?,?,?,?,?,?)",
                     [(e.queue_id, e.copy_id, e.at, e.kind, e.target, e.detail) for e in events])
