"""The shared store: the queue, the message bytes and the leases of several nodes in PostgreSQL.

Internal. `[store] url = "postgresql://..."` chooses it (SQLite stays the embedded default);
it keeps `store.base.Store`'s contract with `store.sqlite`'s semantics (the contract tests run
both). psycopg 3 with a connection pool (`[store] connections` per node); every change is one
transaction and `accept` returns only after its COMMIT did, with `synchronous_commit` at least
`on` (raised to it when the server says `off`; never lowered: a replica's `remote_apply`
stays), so a 250 means the message, its bytes (bytea in `bodies`) and its copies are on the
database's disk. PostgreSQL groups concurrent commits itself. Each node appends the events it
commits to its own audit log (state_dir/audit.jsonl), from a thread of its own.

Several nodes (the design, in docs/scaling.md): a copy is attempted only by the node holding
its lease (`lease_node`, `lease_until` on the database's clock, `lease` long). `accept` leases
the new copies to the accepting node, which delivers them at once without another round trip;
every other attempt first `claim`s its copies: `FOR UPDATE SKIP LOCKED`, granted only when the
copy is still queued, at the target and attempt count the node knows (else another node moved
it on and this node forgets it), and leased by nobody, by this node, by a node that is no
longer alive, or past its lease. An attempt's `update` releases the lease (and is refused when
another node took the copy meanwhile: its events are still written, each attempt once). The
heartbeat (`run`, every lease/3) renews this node's leases and its `nodes` row in one
transaction with `synchronous_commit = off` (a lost lease costs at most a second delivery), and
removes rows of nodes not renewed in time: then `NOTIFY maildetour, 'reload'` wakes every node
(`listen`) to read the queue again and take the dead node's copies (due retries and expired
leases). The operator's changes notify too, from whichever machine they ran. No polling: the
only timer is the heartbeat. A node that stops cleanly releases its leases and notifies, so the
others take its copies at once. The crash window: a node that dies after a copy's remote 250
and before its update committed leaves the copy to be sent again by another node after the
lease (at-least-once; docs/scaling.md has the measured count).

Failure: every psycopg error becomes `StoreUnavailable` (an OSError: ENOSPC for a full disk on
the database server, else EIO) at this one boundary, so inbound answers 451 4.3.0 (452 4.3.1)
and the scheduler waits for `health()`; an operation waits at most `_WAIT` for a connection.
The pool replaces broken connections (a restarted server); the heartbeat is the probe that
clears a failure. Not reachable at start: `run` retries, sessions get 451 meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from maildetour.store import postgres_queue as pq
from maildetour.store.audit import AuditLog
from maildetour.store.cache import BytesCache
from maildetour.store.listing import BytesGone, InFlight, QueueListing, QueueQuery
from maildetour.store.postgres_queue import FINAL, Conn, clean
from maildetour.store.postgres_schema import DB_NOW, describe_url, migrate
from maildetour.store.records import Copy, CopyState, DueCopies, Event, Message, NewCopy, Story
from maildetour.store.retention import RetentionReport
from maildetour.store.schema import SchemaTooNew, SchemaTooOld

T = TypeVar("T")
log = logging.getLogger("maildetour.store")

_WAIT = 10.0  # seconds an operation waits for a connection (a client waits for its 451 no longer)
_CONNECT_TIMEOUT = 5  # seconds to open one connection
_MARK_AFTER = 0.1  # as in store.sqlite: most attempts end sooner and need no mark of their own
_PURGE_BATCH = 500
_MARGIN = 0.25  # of the lease: a local lease this close to its end is claimed again, not trusted
_RETRY_OPEN = (0.5, 10.0)  # first and longest wait between tries to reach the database at start
# First and longest pause between tries of an attempt's update while the database is away.
_RETRY_FIRST, _RETRY_LONGEST = 0.2, 2.0
# A copy is free for this node unless a live node other than it holds an unexpired lease.
_CLAIMABLE = ("(c.lease_node IS NULL OR c.lease_node = %(node)s OR c.lease_until < " + DB_NOW +
              " OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.node = c.lease_node))")


class StoreUnavailable(OSError):
    """The queue database could not do what was asked (unreachable, restarting, full, failed)."""


def _unavailable(exc: BaseException) -> StoreUnavailable:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    full = isinstance(exc, psycopg.errors.DiskFull)
    return StoreUnavailable(errno.ENOSPC if full else errno.EIO, f"the queue database: {text}")


class PostgresStore:
    def __init__(self, url: str, audit_path: Path | None, *, node: str | None, lease: float = 60.0,
                 connections: int = 10, cache_bytes: int = 0, cache_seconds: float = 0.0,
                 upgrade: bool = True, retry_start: bool = False) -> None:
        """`node`: this server's name among the nodes (None: an operator's command, which holds
        no leases). `retry_start`: keep trying to reach the database (the server) rather than
        fail (a command). `audit_path` None: a command that only reads."""
        self.url, self.node, self.lease, self.connections = url, node, lease, connections
        self.upgrade, self.retry_start = upgrade, retry_start
        self.readonly = False
        self._audit = AuditLog(audit_path) if audit_path is not None else None
        self._audit_thread = ThreadPoolExecutor(1, thread_name_prefix="audit")
        self._cache = BytesCache(cache_bytes, cache_seconds)
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._ready = asyncio.Event()
        self._open_error: BaseException | None = None
        self._running = False
        self._release_own = False  # `recover`: leases under this node's name are from an earlier run
        self._failure: str | None = None  # why the last operation failed, until one succeeds
        self._leased: dict[int, float] = {}  # copies leased to this node -> monotonic time to trust it until
        self._last: dict[int, asyncio.Future[Any]] = {}  # copy id -> the last operation asked on it
        self._marks: dict[int, float] = {}  # attempts started, not yet marked (`started`)
        self._mark_timer: asyncio.TimerHandle | None = None
        self._checks: set[asyncio.Future[None]] = set()  # pool checks after a lost connection

    def recover(self) -> None:
        """At the server's start: leases and marks under this node's name are from an earlier run
        of it (a configured `server.node`), and are released once the database is reached."""
        self._release_own = True

    # --- running ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Reach the database (retrying, for the server), make or upgrade the schema, register
        the node; then the heartbeat until cancelled; then release this node's leases."""
        self._running = True
        try:
            await self._open()
            while True:
                await asyncio.sleep(1.0 if self._failure else self.lease / 3)
                if self.node is not None:
                    await self._heartbeat()
        finally:
            self._running = False
            await self._shutdown()

    async def _open(self) -> None:
        wait = _RETRY_OPEN[0]
        while True:
            pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
                self.url, open=False, min_size=1, max_size=self.connections, timeout=_WAIT,
                kwargs={"autocommit": True, "connect_timeout": _CONNECT_TIMEOUT,
                        "application_name": f"maildetour {self.node or 'command'}"[:63]},
                configure=_configure, name="maildetour", reconnect_timeout=float("inf"))
            try:
                await pool.open(wait=True, timeout=_WAIT)
                async with pool.connection() as conn:
                    await migrate(conn, self.url, upgrade=self.upgrade)
                    if self.node is not None:
                        await self._register(conn)
            except (SchemaTooNew, SchemaTooOld) as exc:
                await pool.close()
                self._open_error = exc
                self._ready.set()
                raise
            except (psycopg.Error, OSError) as exc:
                await pool.close()
                failure = _unavailable(exc)
                if not self.retry_start:
                    self._open_error = failure
                    self._ready.set()
                    raise failure from exc
                if self._failure is None:
                    log.error("cannot reach the queue database %s (%s); trying again", describe_url(self.url),
                              failure.strerror)
                self._failure = failure.strerror
                await asyncio.sleep(wait)
                wait = min(wait * 2, _RETRY_OPEN[1])
                continue
            self._pool, self._failure = pool, None
            self._ready.set()
            log.info("queue database %s reached%s", describe_url(self.url),
                     f"; this node is {self.node!r}" if self.node else "")
            return

    async def _register(self, conn: Conn) -> None:
        async with conn.transaction():
            if self._release_own:
                await conn.execute("UPDATE copies SET lease_node=NULL, lease_until=NULL, attempt_started=NULL"
                                   " WHERE lease_node = %s", (self.node,))
            await conn.execute(f"INSERT INTO nodes (node, started_at, alive_until) VALUES (%s, {DB_NOW},"
                               f" {DB_NOW} + %s) ON CONFLICT (node) DO UPDATE SET started_at = EXCLUDED.started_at,"
                               " alive_until = EXCLUDED.alive_until", (self.node, self.lease))

    async def _heartbeat(self) -> None:
        """Renew this node's leases and its row; remove nodes that were not renewed in time and,
        if there were any, tell every node to read the queue again (their copies are free now)."""
        since = time.monotonic()
        try:
            async with self._connection() as conn, conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = off")
                await conn.execute(f"INSERT INTO nodes (node, started_at, alive_until) VALUES (%s, {DB_NOW},"
                                   f" {DB_NOW} + %s) ON CONFLICT (node) DO UPDATE SET alive_until ="
                                   " EXCLUDED.alive_until", (self.node, self.lease))
                await conn.execute(f"UPDATE copies SET lease_until = {DB_NOW} + %s WHERE lease_node = %s",
                                   (self.lease, self.node))
                cur = await conn.execute(f"DELETE FROM nodes WHERE alive_until < {DB_NOW} RETURNING node")
                dead = [r[0] for r in await cur.fetchall()]
                if dead:
                    await pq.notify(conn)
        except StoreUnavailable as exc:
            log.warning("heartbeat failed (%s): this node's leases end in %.0fs unless renewed", exc.strerror,
                        self.lease)
            return
        trusted = since + self.lease * (1 - _MARGIN)
        for copy_id in self._leased:
            self._leased[copy_id] = trusted
        if dead:
            log.warning("nodes %s stopped renewing their leases: their copies are taken over", ", ".join(dead))

    async def _shutdown(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self.node is not None:
            with suppress(psycopg.Error, OSError):
                async with pool.connection(timeout=2.0) as conn, conn.transaction():
                    await conn.execute("UPDATE copies SET lease_node=NULL, lease_until=NULL, attempt_started=NULL"
                                       " WHERE lease_node = %s", (self.node,))
                    await conn.execute("DELETE FROM nodes WHERE node = %s", (self.node,))
                    await pq.notify(conn)
        await pool.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[PostgresStore]:
        """The store with its connection pool open, for a command that is not the server."""
        task = asyncio.create_task(self.run())
        try:
            await self._wait_ready()
            yield self
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError, OSError, SchemaTooNew, SchemaTooOld):
                await task

    def health(self) -> str | None:
        """None when the store can take writes now (cheap: no query). A failed operation keeps
        it unready until one succeeds (the heartbeat probes every second meanwhile)."""
        if not self._running:
            return "the store is not running"
        if self._pool is None:
            return "the queue database is not reachable yet" + (f": {self._failure}" if self._failure else "")
        if self._failure is not None:
            return self._failure
        return None

    def close(self) -> None:
        self._audit_thread.shutdown(wait=True)
        if self._audit is not None:
            self._audit.close()

    def reopen_audit_log(self) -> None:
        if self._audit is not None:
            self._audit.reopen()

    async def listen(self, reload: Callable[[], None], flush: Callable[[], None]) -> None:
        """Until cancelled: the nodes' signals (LISTEN maildetour): 'flush' calls `flush`, anything
        else `reload`. After a lost connection, `reload` once it is back (a signal may have
        been missed meanwhile)."""
        if self.node is None:
            return
        await self._ready.wait()
        wait, lost = _RETRY_OPEN[0], False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                             connect_timeout=_CONNECT_TIMEOUT)
                async with conn:
                    await conn.execute(f"LISTEN {pq.CHANNEL}")
                    if lost:
                        log.info("listening to the other nodes again")
                        reload()
                    wait, lost = _RETRY_OPEN[0], False
                    async for note in conn.notifies():
                        (flush if note.payload == "flush" else reload)()
            except (psycopg.Error, OSError) as exc:
                if not lost:
                    log.warning("not listening to the other nodes (%s); trying again", _unavailable(exc).strerror)
                lost = True
                await asyncio.sleep(wait)
                wait = min(wait * 2, _RETRY_OPEN[1])

    # --- connections and order ------------------------------------------------------------------
    async def _wait_ready(self) -> None:
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), _WAIT)
            except TimeoutError:
                raise StoreUnavailable(errno.EIO, "the queue database is not reachable") from None
        if self._open_error is not None:
            raise self._open_error

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        """A pooled connection; psycopg's errors become StoreUnavailable here, and only here."""
        await self._wait_ready()
        if self._pool is None:
            raise StoreUnavailable(errno.EIO, "the store is not running")
        pool = self._pool
        try:
            async with pool.connection(timeout=_WAIT) as conn:
                yield conn
        except psycopg.Error as exc:
            failure = _unavailable(exc)
            self._failure = failure.strerror
            if isinstance(exc, psycopg.OperationalError):
                check = asyncio.ensure_future(_check(pool))  # others may be broken too (a restarted server)
                self._checks.add(check)
                check.add_done_callback(self._checks.discard)
            raise failure from exc
        self._failure = None

    def _ordered(self, ids: Iterable[int], work: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Run `work` once the operations already asked on these copies are done: each copy's
        changes commit in the order they were asked for (as with SQLite's one writer)."""
        ids = list(ids)
        before = [self._last[i] for i in ids if i in self._last]

        async def after() -> T:
            if before:
                await asyncio.gather(*before, return_exceptions=True)
            return await work()

        task = asyncio.ensure_future(after())
        for i in ids:
            self._last[i] = task

        def done(finished: asyncio.Future[T]) -> None:
            for i in ids:
                if self._last.get(i) is finished:
                    del self._last[i]

        task.add_done_callback(done)
        return task

    def _log(self, events: Sequence[Event]) -> None:
        """Committed events to this node's audit log, in its own thread (in commit order)."""
        if events and self._audit is not None:
            asyncio.get_running_loop().run_in_executor(self._audit_thread, self._write_audit, list(events))

    def _write_audit(self, events: list[Event]) -> None:
        assert self._audit is not None
        try:
            self._audit.write(events)
        except OSError as exc:
            log.error("audit log not written (%s): the events are in the queue database", exc.strerror or exc)
        except Exception:
            log.exception("audit log not written: the events are in the queue database")

    # --- the mail's way through -----------------------------------------------------------------
    async def accept(self, message: Message, data: bytes, copies: Sequence[NewCopy],
                     events: Sequence[Event]) -> list[Copy]:
        logged = list(events)
        made: list[Copy] = []
        leased = self.node is not None
        async with self._connection() as conn:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO messages (queue_id, mail_from, received_at, message_id, size, client)"
                    " VALUES (%s, %s, %s, %s, %s, %s)",
                    (message.queue_id, clean(message.mail_from), message.received_at, clean(message.message_id),
                     message.size, clean(message.client)))
                await conn.execute("INSERT INTO bodies (queue_id, data) VALUES (%s, %b)", (message.queue_id, data))
                for c in copies:
                    lease = leased and c.state == "queued"
                    cur = await conn.execute(
                        "INSERT INTO copies (queue_id, recipient, target, origin, hidden_origin, state, next_at,"
                        " lease_node, lease_until) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
                        f" {DB_NOW} + %s) RETURNING id",
                        (message.queue_id, clean(c.recipient), clean(c.target), clean(c.target), c.hidden, c.state,
                         message.received_at, self.node if lease else None, self.lease if lease else None))
                    row = await cur.fetchone()
                    assert row is not None
                    copy = Copy(id=row[0], queue_id=message.queue_id, mail_from=message.mail_from,
                                recipient=c.recipient, target=c.target, origin=c.target, hidden=c.hidden,
                                state=c.state, attempts=0, next_at=message.received_at, first_failure=None,
                                detours=0, received_at=message.received_at, size=message.size)
                    made.append(copy)
                    if c.state != "queued":
                        logged.append(Event(message.received_at, message.queue_id, copy.id, c.state,  # type: ignore[arg-type]
                                            c.target, c.why))
                await pq.insert_events(conn, logged)
            # COMMIT returned: the 250 may go.
        trusted = time.monotonic() + self.lease * (1 - _MARGIN)
        for copy in made:
            if leased and copy.state == "queued":
                self._leased[copy.id] = trusted
        self._log(logged)
        self._cache.put(message.queue_id, data)
        return made

    async def claim(self, copies: Sequence[Copy], now: float) -> list[Copy]:
        """The copies this node may attempt now (see the module's header). Those it leased
        itself and still trusts cost no round trip."""
        if self.node is None:
            raise StoreUnavailable(errno.EPERM, "an operator's command does not deliver")
        moment = time.monotonic()
        if all(self._leased.get(c.id, 0.0) > moment and c.id not in self._last for c in copies):
            return list(copies)
        return await self._ordered([c.id for c in copies], lambda: self._claim(copies, now))

    async def _claim(self, copies: Sequence[Copy], now: float) -> list[Copy]:
        moment = time.monotonic()
        args = {"ids": [c.id for c in copies], "targets": [c.target for c in copies],
                "attempts": [c.attempts for c in copies], "node": self.node, "lease": self.lease, "now": now}
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = off")  # a lost lease: a copy sent twice at most
            cur = await conn.execute(
                "WITH wanted AS (SELECT c.id FROM copies c JOIN unnest(%(ids)s::bigint[], %(targets)s::text[],"
                " %(attempts)s::integer[]) AS k(id, target, attempts) ON c.id = k.id AND c.target = k.target"
                f" AND c.attempts = k.attempts WHERE c.state = 'queued' AND {_CLAIMABLE} FOR UPDATE OF c SKIP LOCKED)"
                f" UPDATE copies SET lease_node = %(node)s, lease_until = {DB_NOW} + %(lease)s,"
                " attempt_started = %(now)s FROM wanted WHERE copies.id = wanted.id RETURNING copies.id", args)
            granted = {r[0] for r in await cur.fetchall()}
        trusted = moment + self.lease * (1 - _MARGIN)
        for copy_id in granted:
            self._leased[copy_id] = trusted
        return [c for c in copies if c.id in granted]

    def update(self, copy: Copy, events: Sequence[Event]) -> Awaitable[bool]:
        held = self._leased.pop(copy.id, None) is not None
        self._marks.pop(copy.id, None)
        return self._ordered([copy.id], lambda: self._update_again(copy, events, held))

    async def _update_again(self, copy: Copy, events: Sequence[Event], held: bool) -> bool:
        """`_update`, tried again while the database cannot be reached (a restart), for as long
        as this node's lease would last: the attempt's result (often a remote 250) is kept, not
        forgotten and sent again once the database is back. Safe to repeat: the update applies
        only while this node holds the copy. A COMMIT whose reply was lost repeats the events."""
        deadline, pause = time.monotonic() + self.lease, _RETRY_FIRST
        while True:
            try:
                return await self._update(copy, events, held)
            except StoreUnavailable as exc:
                if exc.errno != errno.EIO or time.monotonic() + pause > deadline:
                    raise
                log.warning("copy %d: the queue database did not take its update (%s); trying again in %.1f s",
                            copy.id, exc.strerror, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_LONGEST)

    async def _update(self, copy: Copy, events: Sequence[Event], held: bool) -> bool:
        # Held by this node: only while it still is (another may have taken it over after the
        # lease ran out). Not held (a late bounce about a delivered copy): unless another holds it.
        mine = "lease_node = %(node)s" if held else "(lease_node IS NULL OR lease_node = %(node)s)"
        args = {"target": clean(copy.target), "hidden": copy.hidden, "state": copy.state, "attempts": copy.attempts,
                "next_at": copy.next_at, "first_failure": copy.first_failure, "detours": copy.detours,
                "id": copy.id, "node": self.node}
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE copies SET target=%(target)s, hidden_origin=%(hidden)s, state=%(state)s, attempts=%(attempts)s,"
                " next_at=%(next_at)s, first_failure=%(first_failure)s, detours=%(detours)s, attempt_started=NULL,"
                f" lease_node=NULL, lease_until=NULL WHERE id=%(id)s AND state NOT IN ('held', 'deleted') AND {mine}",
                args)
            written = cur.rowcount == 1
            if not written:  # the operator's hand (or another node) won; this attempt is over all the same
                await conn.execute("UPDATE copies SET attempt_started=NULL, lease_node=NULL, lease_until=NULL"
                                   " WHERE id=%(id)s AND lease_node = %(node)s", args)
            await pq.insert_events(conn, events)
        self._log(events)
        return written

    async def unfinished(self) -> list[Copy]:
        """Every queued copy this node may take: not leased by another live node."""
        async with self._connection() as conn:
            return await pq.select_copies(conn, f"WHERE c.state = 'queued' AND {_CLAIMABLE} ORDER BY c.next_at",
                                          {"node": self.node})

    async def due(self, before: float, limit: int) -> DueCopies:
        """Queued copies this node may take, due before `before` (soonest first, by due time then
        id), at most `limit`, and how many such copies come after them (`copies_due`)."""
        args: dict[str, Any] = {"node": self.node, "before": before, "limit": limit}
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            found = await pq.select_copies(conn, f"WHERE c.state = 'queued' AND c.next_at < %(before)s AND {_CLAIMABLE}"
                                           " ORDER BY c.next_at, c.id LIMIT %(limit)s", args)
            if len(found) < limit:
                after = "c.next_at >= %(before)s"
            else:
                after = "(c.next_at > %(at)s OR (c.next_at = %(at)s AND c.id > %(id)s))"
                args |= {"at": found[-1].next_at, "id": found[-1].id}
            cur = await conn.execute(f"SELECT count(*) FROM copies c WHERE c.state = 'queued' AND {after}"
                                     f" AND {_CLAIMABLE}", args)
            row = await cur.fetchone()
        return DueCopies(tuple(found), int(row[0]) if row else 0)

    async def oldest_queued(self) -> float | None:
        async with self._connection() as conn:
            cur = await conn.execute("SELECT m.received_at FROM messages m WHERE NOT m.finished AND EXISTS"
                                     " (SELECT 1 FROM copies c WHERE c.queue_id = m.queue_id AND c.state = 'queued')"
                                     " ORDER BY m.received_at LIMIT 1")
            row = await cur.fetchone()
        return None if row is None else float(row[0])

    async def read(self, queue_id: str) -> bytes:
        data = self._cache.get(queue_id)
        if data is None:
            async with self._connection() as conn:
                cur = await conn.execute("SELECT data FROM bodies WHERE queue_id = %s", (queue_id,), binary=True)
                row = await cur.fetchone()
            if row is None:
                raise FileNotFoundError(errno.ENOENT, "message bytes not in the queue database", queue_id)
            data = bytes(row[0])
            self._cache.put(queue_id, data)
        return data

    async def finish(self, queue_id: str, keep_until: float | None = None) -> None:
        self._cache.drop(queue_id)
        async with self._connection() as conn, conn.transaction():
            await self._mark_finished(conn, queue_id, keep_until, only_if_done=False)

    async def finish_if_done(self, queue_id: str, keep_until: float | None = None) -> bool:
        """Finished only when no copy of it is queued any more, checked in the same statement
        (several nodes may share a message's copies: the last to finish one finishes it)."""
        async with self._connection() as conn, conn.transaction():
            done = await self._mark_finished(conn, queue_id, keep_until, only_if_done=True)
        if done:
            self._cache.drop(queue_id)
        return done

    async def _mark_finished(self, conn: Conn, queue_id: str, keep_until: float | None, *, only_if_done: bool) -> bool:
        # finished_at (retention counts from it): the time of the message's last event.
        unless = (" AND NOT EXISTS (SELECT 1 FROM copies c WHERE c.queue_id = m.queue_id AND c.state = 'queued')"
                  if only_if_done else "")
        cur = await conn.execute(
            "UPDATE messages m SET finished=true, keep_until=%s, finished_at=coalesce((SELECT max(at) FROM events"
            f" WHERE queue_id=%s), received_at) WHERE queue_id=%s{unless}", (keep_until, queue_id, queue_id))
        if cur.rowcount and keep_until is None:
            await pq.remove_unless_held(conn, queue_id)
        return cur.rowcount > 0

    async def find_copy(self, key: str, target: str) -> Copy | None:
        async with self._connection() as conn:
            found = await pq.select_copies(
                conn, "WHERE (m.queue_id=%s OR m.message_id=%s) AND lower(c.target)=%s ORDER BY c.id LIMIT 1",
                (key, key, target.lower()))
        return found[0] if found else None

    async def kept(self, queue_id: str, now: float) -> bool:
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT (NOT finished OR (keep_until IS NOT NULL AND keep_until >= %s)) AND EXISTS"
                " (SELECT 1 FROM bodies b WHERE b.queue_id = m.queue_id) FROM messages m WHERE queue_id=%s",
                (now, queue_id))
            row = await cur.fetchone()
        return bool(row and row[0])

    async def purge(self, now: float) -> int:
        removed = 0
        while True:
            async with self._connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "UPDATE messages m SET keep_until = NULL WHERE queue_id IN (SELECT queue_id FROM messages"
                    " WHERE keep_until < %s AND finished LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING queue_id,"
                    " NOT EXISTS (SELECT 1 FROM copies c WHERE c.queue_id = m.queue_id AND c.state <> ALL(%s))",
                    (now, _PURGE_BATCH, FINAL))
                rows = await cur.fetchall()
                gone = [r[0] for r in rows if r[1]]  # quarantined copies keep theirs
                if gone:
                    await conn.execute("DELETE FROM bodies WHERE queue_id = ANY(%s)", (gone,))
            for queue_id in gone:
                self._cache.drop(queue_id)
            removed += len(gone)
            if len(rows) < _PURGE_BATCH:
                return removed
            await asyncio.sleep(0)

    # --- retention ------------------------------------------------------------------------------
    async def expire_quarantined(self, before: float, now: float, limit: int) -> int:
        events: list[Event] = []
        async with self._connection() as conn, conn.transaction():
            count = await pq.expire_quarantined(conn, before, now, limit, events)
        self._log(events)
        return count

    async def purge_finished(self, before: float, now: float, limit: int) -> int:
        async with self._connection() as conn, conn.transaction():
            return await pq.purge_finished(conn, before, now, limit)

    async def retention_report(self, now: float) -> RetentionReport:
        async with self._connection() as conn:
            return await pq.retention_report(conn, now)

    # --- the operator's view and hands ----------------------------------------------------------
    async def story(self, key: str) -> Story | None:
        async with self._connection() as conn:
            return await pq.story(conn, key)

    async def copies(self, states: Sequence[CopyState] | None, limit: int) -> list[Copy]:
        where, args = ("", [limit]) if states is None else ("WHERE c.state = ANY(%s)", [list(states), limit])
        async with self._connection() as conn:
            return await pq.select_copies(conn, f"{where} ORDER BY c.queue_id, c.id LIMIT %s", args)

    async def flush(self, now: float, *, queue_id: str | None = None, dest: str | None = None,
                    later_only: bool = False) -> int:
        events: list[Event] = []
        async with self._connection() as conn, conn.transaction():
            count = await pq.flush(conn, now, queue_id, dest, events, later_only)
        self._log(events)
        return count

    async def hold(self, queue_id: str, now: float) -> int:
        return await self._change(queue_id, now, "held", "held", ("queued",), "queued copies held by the operator")

    async def release(self, queue_id: str, now: float) -> int:
        return await self._change(queue_id, now, "queued", "released", ("held", "quarantined"),
                                  "held or quarantined copies queued again by the operator")

    async def delete(self, queue_id: str, now: float, *, refuse_in_flight: bool = False) -> int | InFlight:
        events: list[Event] = []
        async with self._connection() as conn, conn.transaction():
            busy = await pq.in_flight(conn, queue_id) if refuse_in_flight else ()
            if busy:
                return InFlight(busy)
            count = await pq.change(conn, queue_id, now, "deleted", "deleted", ("queued", "held", "quarantined"),
                                    "copies deleted by the operator", events)
        self._log(events)
        return count

    async def _change(self, queue_id: str, now: float, state: CopyState, kind: str,
                      from_states: tuple[CopyState, ...], what: str) -> int:
        events: list[Event] = []
        async with self._connection() as conn, conn.transaction():
            count = await pq.change(conn, queue_id, now, state, kind, from_states, what, events)
        self._log(events)
        return count

    def started(self, copy_ids: Sequence[int], now: float) -> None:
        """Mark an attempt's copies after `_MARK_AFTER` if it has not reported by then (a claim
        that went to the database marked them already)."""
        for copy_id in copy_ids:
            self._marks[copy_id] = now
        if self._mark_timer is None:
            self._mark_timer = asyncio.get_running_loop().call_later(_MARK_AFTER, self._write_marks)

    def _write_marks(self) -> None:
        marks, self._marks, self._mark_timer = self._marks, {}, None
        if not marks or self.node is None:
            return

        async def write() -> None:
            async with self._connection() as conn:
                await conn.execute("UPDATE copies SET attempt_started = k.at FROM unnest(%s::bigint[],"
                                   " %s::double precision[]) AS k(id, at) WHERE copies.id = k.id AND state = 'queued'"
                                   " AND lease_node = %s", (list(marks), list(marks.values()), self.node))

        self._ordered(marks, write).add_done_callback(_marks_failed)

    async def listing(self, query: QueueQuery) -> QueueListing:
        async with self._connection() as conn:
            return await pq.listing(conn, query)

    async def requeue(self, queue_id: str, now: float) -> int | BytesGone:
        events: list[Event] = []
        async with self._connection() as conn, conn.transaction():
            result = await pq.requeue(conn, queue_id, now, events)
        self._log(events)
        return result


async def _configure(conn: Conn) -> None:
    """Each new connection: commits are durable before they return (`synchronous_commit` at
    least `on`: raised from `off`, never lowered from a stronger setting)."""
    cur = await conn.execute("SHOW synchronous_commit")
    row = await cur.fetchone()
    if row is not None and row[0] == "off":
        await conn.execute("SET synchronous_commit = on")


async def _check(pool: AsyncConnectionPool[Conn]) -> None:
    with suppress(Exception):
        await pool.check()


def _marks_failed(marked: asyncio.Future[None]) -> None:
    if not marked.cancelled() and marked.exception() is not None:
        log.warning("attempts not marked in flight: %s", marked.exception())


__all__ = ["PostgresStore", "StoreUnavailable"]
