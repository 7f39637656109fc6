"""The SQL of the operator's view and hands and of retention, for `store.postgres`: the stories,
listings, flushing, holding, releasing, deleting, requeueing, and the retention sweep.

Internal: plain async functions on a connection (autocommit), each run by `PostgresStore` in a
transaction of its own where it changes anything; they keep `store.sqlite`'s and
`store.sqlite_queue`'s semantics exactly (the contract tests run both). Every change an
operator makes notifies the nodes (`pg_notify` in the same transaction: they read the queue
again, wherever the command ran). The retention sweeps of several nodes may run at once: they
take their batches with `FOR UPDATE SKIP LOCKED`, so none waits for another. Failure: psycopg
errors to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from maildetour.store.listing import (
    REPLY_KINDS,
    BytesGone,
    ListedCopy,
    ListedMessage,
    QueueListing,
    QueueQuery,
)
from maildetour.store.records import FINAL_STATES, Copy, CopyState, Event, Message, Story
from maildetour.store.retention import RetentionReport
from maildetour.store.sqlite_queue import REQUEUE_STATES, dest_clause

Conn = AsyncConnection[TupleRow]
CHANNEL = "maildetour"  # LISTEN/NOTIFY: 'reload' (read the queue again) or 'flush' (and all due now)
FINAL = list(FINAL_STATES)
COPY_COLUMNS = (
    "c.id, c.queue_id, m.mail_from, c.recipient, c.target, c.origin, c.hidden_origin, c.state, c.attempts,"
    " c.next_at, c.first_failure, c.detours, m.received_at, m.size"
)
_LEASE_LIVE = ("c.lease_node IS NOT NULL AND c.lease_until >= extract(epoch from clock_timestamp())"
               " AND EXISTS (SELECT 1 FROM nodes n WHERE n.node = c.lease_node)")


def clean(text: str) -> str:
    """Text PostgreSQL can store: no NUL, no lone surrogate (a remote's reply may hold either)."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def make_copy(row: Sequence[Any]) -> Copy:
    return Copy(id=row[0], queue_id=row[1], mail_from=row[2], recipient=row[3], target=row[4], origin=row[5],
                hidden=bool(row[6]), state=row[7], attempts=row[8], next_at=row[9], first_failure=row[10],
                detours=row[11], received_at=row[12], size=row[13])


async def insert_events(conn: Conn, events: Sequence[Event]) -> None:
    if events:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO events (queue_id, copy_id, at, kind, target, detail) VALUES (%s, %s, %s, %s, %s, %s)",
                [(e.queue_id, e.copy_id, e.at, e.kind, clean(e.target), clean(e.detail)) for e in events])


async def notify(conn: Conn, what: str = "reload") -> None:
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, what))


async def select_copies(conn: Conn, where: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[Copy]:
    cur = await conn.execute(f"SELECT {COPY_COLUMNS} FROM copies c JOIN messages m USING (queue_id) {where}",
                             args)
    return [make_copy(r) for r in await cur.fetchall()]


async def story(conn: Conn, key: str) -> Story | None:
    cur = await conn.execute(
        "SELECT queue_id, mail_from, received_at, message_id, size, client FROM messages"
        " WHERE queue_id=%s OR message_id=%s OR message_id=%s ORDER BY received_at LIMIT 1",
        (key, key, f"<{key.strip('<>')}>"))
    row = await cur.fetchone()
    if row is None:
        return None
    message = Message(*row)
    copies = tuple(await select_copies(conn, "WHERE c.queue_id=%s ORDER BY c.id", (message.queue_id,)))
    cur = await conn.execute("SELECT at, copy_id, kind, target, detail FROM events WHERE queue_id=%s ORDER BY id",
                             (message.queue_id,))
    events = tuple(Event(at=r[0], queue_id=message.queue_id, copy_id=r[1], kind=r[2], target=r[3], detail=r[4])
                   for r in await cur.fetchall())
    return Story(message, copies, events)


def _sql(clause: str) -> str:
    """A clause shared with `store.sqlite_queue` ("?" placeholders) in psycopg's spelling."""
    return clause.replace("?", "%s")


def _where(query: QueueQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if query.states is not None:
        clauses.append("c.state = ANY(%s)")
        args.append(list(query.states))
    if query.dest:
        clause, more = dest_clause(query.dest)
        clauses.append(_sql(clause))
        args += more
    if query.received_before is not None:
        clauses.append("m.received_at < %s")
        args.append(query.received_before)
    return " AND ".join(clauses) or "true", args


async def listing(conn: Conn, query: QueueQuery) -> QueueListing:
    """In one REPEATABLE READ transaction: the totals and the rows agree."""
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return await _listing(conn, query)


async def _listing(conn: Conn, query: QueueQuery) -> QueueListing:
    where, args = _where(query)
    matched = (f"WITH matched AS (SELECT m.queue_id, m.received_at, m.size, count(*) AS n FROM copies c"
               f" JOIN messages m USING (queue_id) WHERE {where} GROUP BY m.queue_id, m.received_at, m.size)")
    cur = await conn.execute(f"{matched} SELECT count(*), coalesce(sum(n), 0), coalesce(sum(size), 0)"
                             " FROM matched", args)
    total_messages, total_copies, total_bytes = await cur.fetchone() or (0, 0, 0)
    order = "DESC" if query.newest_first else "ASC"
    cur = await conn.execute(f"{matched} SELECT queue_id FROM matched ORDER BY received_at {order},"
                             f" queue_id {order} LIMIT %s", (*args, max(query.limit, 0)))
    ids = [r[0] for r in await cur.fetchall()]
    found = await select_copies(conn, f"WHERE {where} AND c.queue_id = ANY(%s) ORDER BY c.id", (*args, ids))
    cur = await conn.execute("SELECT queue_id, mail_from, received_at, message_id, size, client FROM messages"
                             " WHERE queue_id = ANY(%s)", (ids,))
    messages = {r[0]: Message(*r) for r in await cur.fetchall()}
    # An attempt's mark means something only while its node holds the lease (a node that died
    # leaves marks that nobody clears at once).
    cur = await conn.execute(f"SELECT id, attempt_started FROM copies c WHERE queue_id = ANY(%s)"
                             f" AND attempt_started IS NOT NULL AND {_LEASE_LIVE}", (ids,))
    marks: dict[int, float] = {r[0]: r[1] for r in await cur.fetchall()}
    cur = await conn.execute(
        "SELECT DISTINCT ON (copy_id) copy_id, at, queue_id, kind, target, detail FROM events"
        " WHERE queue_id = ANY(%s) AND copy_id IS NOT NULL AND kind = ANY(%s) ORDER BY copy_id, id DESC",
        (ids, list(REPLY_KINDS)))
    replies = {r[0]: Event(at=r[1], queue_id=r[2], copy_id=r[0], kind=r[3], target=r[4], detail=r[5])
               for r in await cur.fetchall()}
    by_message: dict[str, list[ListedCopy]] = {}
    for c in found:
        by_message.setdefault(c.queue_id, []).append(ListedCopy(c, replies.get(c.id), marks.get(c.id)))
    listed = tuple(ListedMessage(messages[q], tuple(by_message.get(q, ()))) for q in ids)
    return QueueListing(listed, total_messages, total_copies, total_bytes)


async def flush(conn: Conn, now: float, queue_id: str | None, dest: str | None, events: list[Event],
                later_only: bool = False) -> int:
    clauses: list[str] = ["c.state = 'queued'"]
    args: list[Any] = []
    if later_only:
        clauses.append("c.next_at > %s")
        args.append(now)
    if queue_id is not None:
        clauses.append("c.queue_id = %s")
        args.append(queue_id)
    if dest is not None:
        clause, more = dest_clause(dest)
        clauses.append(_sql(clause))
        args += more
    where = " AND ".join(clauses)
    cur = await conn.execute(f"SELECT c.queue_id, count(*) FROM copies c WHERE {where} GROUP BY c.queue_id"
                             " ORDER BY c.queue_id", args)
    counts = await cur.fetchall()
    if not counts:
        return 0
    await conn.execute(f"UPDATE copies AS c SET next_at = %s WHERE {where}", (now, *args))
    to = f" to {dest}" if dest is not None else ""
    events += [Event(now, q, None, "flushed", "",
                     f"{n} queued cop{'y' if n == 1 else 'ies'}{to} due now, by the operator") for q, n in counts]
    await insert_events(conn, events)
    await notify(conn, "flush" if queue_id is None and dest is None else "reload")
    return sum(n for _, n in counts)


async def remove_unless_held(conn: Conn, queue_id: str) -> None:
    """The message's bytes go unless a copy may still need them."""
    await conn.execute("DELETE FROM bodies b WHERE queue_id = %s AND NOT EXISTS (SELECT 1 FROM copies c"
                       " WHERE c.queue_id = b.queue_id AND c.state <> ALL(%s))", (queue_id, FINAL))


async def change(conn: Conn, queue_id: str, now: float, state: CopyState, kind: str,
                 from_states: Sequence[CopyState], what: str, events: list[Event]) -> int:
    """One of the operator's changes (hold, release, delete); `events` gets its event."""
    cur = await conn.execute("UPDATE copies SET state=%s, attempts=0, first_failure=NULL, next_at=%s"
                             " WHERE queue_id=%s AND state = ANY(%s)", (state, now, queue_id, list(from_states)))
    count = cur.rowcount
    if not count:
        return 0
    events.append(Event(now, queue_id, None, kind, "", f"{count} {what}"))  # type: ignore[arg-type]
    await insert_events(conn, events)
    if state == "queued":
        await conn.execute("UPDATE messages SET finished=false, finished_at=NULL WHERE queue_id=%s", (queue_id,))
    elif state == "deleted":
        await conn.execute("UPDATE messages SET finished=true, keep_until=NULL, finished_at=%s WHERE queue_id=%s",
                           (now, queue_id))
        await remove_unless_held(conn, queue_id)
    await notify(conn)
    return count


async def in_flight(conn: Conn, queue_id: str) -> tuple[int, ...]:
    """Copies of the message in an attempt now: marked, and leased by a node that is alive."""
    cur = await conn.execute(f"SELECT id FROM copies c WHERE queue_id=%s AND attempt_started IS NOT NULL"
                             f" AND {_LEASE_LIVE} ORDER BY id", (queue_id,))
    return tuple(r[0] for r in await cur.fetchall())


async def requeue(conn: Conn, queue_id: str, now: float, events: list[Event]) -> int | BytesGone:
    cur = await conn.execute("SELECT id, target, origin, state FROM copies WHERE queue_id=%s AND state = ANY(%s)"
                             " ORDER BY id FOR UPDATE", (queue_id, list(REQUEUE_STATES)))
    chosen = await cur.fetchall()
    if not chosen:
        return 0
    cur = await conn.execute("SELECT 1 FROM bodies WHERE queue_id=%s", (queue_id,))
    if await cur.fetchone() is None:
        return BytesGone()
    await conn.execute("UPDATE copies SET state='queued', target=origin, attempts=0, first_failure=NULL, detours=0,"
                       " next_at=%s, attempt_started=NULL, lease_node=NULL, lease_until=NULL WHERE id = ANY(%s)",
                       (now, [r[0] for r in chosen]))
    await conn.execute("UPDATE messages SET finished=false, keep_until=NULL, finished_at=NULL WHERE queue_id=%s",
                       (queue_id,))
    events += [Event(now, queue_id, copy_id, "requeued", origin,
                     f"{state} at {target}: queued again at its first target, attempts reset, by the operator")
               for copy_id, target, origin, state in chosen]
    await insert_events(conn, events)
    await notify(conn)
    return len(chosen)


# --- retention ----------------------------------------------------------------------------------
async def expire_quarantined(conn: Conn, before: float, now: float, limit: int, events: list[Event]) -> int:
    cur = await conn.execute(
        "UPDATE copies SET state = 'deleted' WHERE id IN (SELECT id FROM copies WHERE state = 'quarantined'"
        " AND next_at < %s ORDER BY next_at LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, queue_id, target",
        (before, limit))
    rows = await cur.fetchall()
    events.extend(Event(now, queue_id, copy_id, "deleted", target,
                        "quarantined longer than store.quarantine_retention: deleted, never delivered")
                  for copy_id, queue_id, target in rows)
    await insert_events(conn, events)
    for queue_id in dict.fromkeys(r[1] for r in rows):
        await _settle_expired(conn, queue_id, now)
    return len(rows)


async def _settle_expired(conn: Conn, queue_id: str, now: float) -> None:
    """A message lost a quarantined copy to retention: with nothing left to deliver it is finished
    now, and its bytes go unless kept for late bounces."""
    cur = await conn.execute("UPDATE messages m SET finished = true, finished_at = %s WHERE queue_id = %s"
                             " AND NOT EXISTS (SELECT 1 FROM copies c WHERE c.queue_id = m.queue_id"
                             " AND c.state <> ALL(%s)) RETURNING keep_until", (now, queue_id, FINAL))
    row = await cur.fetchone()
    if row is not None and (row[0] is None or row[0] < now):
        await conn.execute("DELETE FROM bodies WHERE queue_id = %s", (queue_id,))


async def purge_finished(conn: Conn, before: float, now: float, limit: int) -> int:
    nothing_left = " AND NOT EXISTS (SELECT 1 FROM copies c WHERE c.queue_id = m.queue_id AND c.state <> ALL(%s))"
    cur = await conn.execute(
        "SELECT queue_id FROM messages m WHERE finished AND finished_at < %s"
        f" AND (keep_until IS NULL OR keep_until < %s){nothing_left} ORDER BY finished_at LIMIT %s"
        " FOR UPDATE SKIP LOCKED", (before, now, FINAL, limit))
    found = [r[0] for r in await cur.fetchall()]
    if len(found) < limit:  # never marked finished (a crash between its last update and finish)
        cur = await conn.execute(
            f"SELECT queue_id FROM messages m WHERE NOT finished AND received_at < %s{nothing_left}"
            " ORDER BY received_at LIMIT %s FOR UPDATE SKIP LOCKED", (before, FINAL, limit - len(found)))
        found += [r[0] for r in await cur.fetchall()]
    if found:
        for table in ("events", "copies", "bodies", "messages"):
            await conn.execute(f"DELETE FROM {table} WHERE queue_id = ANY(%s)", (found,))
    return len(found)


async def retention_report(conn: Conn, now: float) -> RetentionReport:
    async def one(sql: str, args: Sequence[Any] = ()) -> Any:
        cur = await conn.execute(sql, args)
        return await cur.fetchone()

    finished, oldest = await one("SELECT count(*), min(finished_at) FROM messages WHERE finished")
    kept, until = await one("SELECT count(*), max(keep_until) FROM messages WHERE keep_until >= %s AND finished",
                            (now,))
    (late,) = await one("SELECT count(*) FROM messages m WHERE NOT EXISTS"
                        " (SELECT 1 FROM copies c WHERE c.queue_id = m.queue_id)")
    quarantined, since = await one("SELECT count(*), min(next_at) FROM copies WHERE state = 'quarantined'")
    return RetentionReport(finished, oldest, kept, until, late, quarantined, since)
