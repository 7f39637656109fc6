"""The scheduler (Postfix's qmgr): every copy is tried at once, retried later, detoured.

Internal. It only schedules: `submit` is called right after a message is committed (no polling
tick); due copies of one message that the same agent may deliver together (its `batch_key`) go
out as one job; the agent reports an outcome per copy; `core.policy` decides; the decision
and its events are written to the store. What a decision needs done elsewhere is done there:
a private DSN by `bounces.DsnWriter`, signing and `skip_when` by the agents in front of the SMTP
agent. Like Postfix's active queue, memory holds only the copies due soon: those due within
`horizon` seconds, at most `active_limit` of them (soonest first); the rest stay in the store,
which is asked for the next ones (`Store.due`) when the horizon nears or memory runs low, so
memory does not grow with the deferred queue (issue 13). On start-up the queue is read so
again, and what was in flight before a crash is simply tried again (at-least-once); `flush`
makes every queued copy due now and `reload` picks up what the operator changed (held,
deleted, released, requeued, flushed copies). A message is finished when its last copy here is
final and the store has no other copy of it queued (`Store.finish_if_done`). Each attempt
first claims its copies (`Store.claim`: with several nodes, a copy another node holds is not
tried here, and forgotten; one node: all granted) and marks them in the store (so `queue
delete` can refuse them); `Store.listen` hears the other nodes (reload, flush). At most
`max_parallel_attempts` attempts run at once. Message bytes come from the store (which keeps
recent ones in memory). Fails safe: a store that cannot be read or written pauses attempts
until it can (`Store.health`), then the queue is read again.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import sqlite3
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Awaitable, Callable, Iterable, Mapping

from maildetour.core.outcome import (
    Delivered,
    Outcome,
    PermanentFailure,
    TemporaryFailure,
    Unreachable,
)
from maildetour.core.policy import (
    Attempted,
    Bounce,
    Decision,
    Detour,
    Done,
    Fail,
    Quarantine,
    Retry,
    RetryRules,
    decide,
)
from maildetour.core.routing import Kind, RoutingTable
from maildetour.delivery.base import Agent, Job
from maildetour.delivery.bounces import DsnWriter
from maildetour.metrics import Metrics
from maildetour.store.base import Store
from maildetour.store.records import Copy, Event, EventKind

log = logging.getLogger("maildetour.delivery")

_Group = tuple[str, Kind, str]  # queue id, kind of agent, the agent's batch key
_Key = tuple[float, int]  # a copy's place in the queue: (due time, id)

# The active queue (issue 13; Postfix's qmgr keeps one too, qmgr_message_active_limit 20,000):
# memory holds the queued copies due within HORIZON seconds, at most ACTIVE_LIMIT of them,
# soonest first (about 1 KB each); the deferred rest stay in the store. The store is read
# again halfway to the horizon, so a read every 150 s at most costs one index range.
HORIZON = 300.0
ACTIVE_LIMIT = 10_000


@dataclass(slots=True)
class _Throttle:
    """A destination that said we send too fast: nothing goes there before `until`."""

    until: float
    delay: float  # how long this time; doubles while the destination keeps saying so


class Scheduler:
    def __init__(self, *, store: Store, table: RoutingTable, agents: Mapping[Kind, Agent],
                 retry: RetryRules, max_parallel: int, dsn: DsnWriter, keep_for: float | None,
                 clock: Callable[[], float], rate_delay: float = 0.0, max_bytes: int = 0,
                 metrics: Metrics | None = None, horizon: float = HORIZON,
                 active_limit: int = ACTIVE_LIMIT) -> None:
        """`keep_for`: how long a finished message's bytes stay for late bounces (None: not
        kept, when nothing can come back to an SRS address of ours). `rate_delay`: least time
        between two deliveries to one destination (0: none). `max_bytes`: message bytes that
        attempts in flight may hold at once (0: no limit; one attempt always goes). `metrics`:
        where each attempt's result is counted (None: nowhere). `horizon`, `active_limit`: the
        copies held in memory (those due within `horizon` seconds, at most `active_limit`)."""
        self.store, self.table, self.agents, self.dsn, self.metrics = store, table, agents, dsn, metrics
        self.retry, self.max_parallel, self.keep_for, self.clock = retry, max_parallel, keep_for, clock
        self.rate_delay, self.max_bytes = rate_delay, max_bytes
        self._bytes = 0  # message bytes held by attempts in flight
        self._throttles: dict[str, _Throttle] = {}  # destination -> asked us to slow down
        self._next_start: dict[str, float] = {}  # destination -> earliest next delivery (pacing)
        self._heap: list[tuple[float, int, int]] = []  # (due, tie-breaker, copy id)
        self._seq = itertools.count()
        self._copies: dict[int, Copy] = {}  # the queued copies held here (see `_keeps`)
        self._by_message: dict[str, int] = {}  # queue id -> how many of its copies are held here
        # The horizon: every queued copy whose (due time, id) is below it is held here (or in an
        # attempt); those at or after it are in the store only (`_later` of them, as the store
        # counted them at the last read, plus those left there since: a gauge, not a ledger).
        # Nothing read yet: everything submitted is held.
        self.horizon, self.active_limit = horizon, active_limit
        self._horizon: _Key = (math.inf, 0)
        self._later = 0
        self._read_at = -math.inf  # when the store is read next (halfway to the horizon)
        # While a read is in flight: copies held or rescheduled meanwhile (the read may predate
        # them: kept), and the lowest key left to the store meanwhile (the horizon stays below it).
        self._arrived: set[int] | None = None
        self._evicted: _Key | None = None
        self._oldest_stored: tuple[float, float | None] = (-math.inf, None)  # (read at, `Store.oldest_queued`)
        self._oldest_wanted = False  # the gauge asked for a newer one
        # Copies in an attempt, each with the attempt's token: an attempt frees only its own.
        self._busy: dict[int, object] = {}
        self._wake = asyncio.Event()
        self._running = 0  # attempts in flight
        self._attempts: set[asyncio.Task[None]] = set()  # the same, as tasks (a reload waits for them)
        self._flush_requested = self._reload_requested = False
        self._store_down = False  # a write failed: no attempt starts until `store.health()` is fine
        self.store_recheck = _STORE_RECHECK
        self._dropping: list[set[int]] = []  # per `_read` in progress: copies forgotten meanwhile

    def reconfigure(self, *, table: RoutingTable, agents: Mapping[Kind, Agent], retry: RetryRules,
                    max_parallel: int, dsn: DsnWriter, keep_for: float | None, rate_delay: float,
                    max_bytes: int) -> Awaitable[object]:
        """A reload: attempts from now on use these; the queue, throttles and attempts in flight
        stay. Returns what to await before the old agents may be closed (the attempts that
        were already running with them)."""
        self.table, self.agents, self.retry, self.max_parallel = table, agents, retry, max_parallel
        self.dsn, self.keep_for, self.rate_delay, self.max_bytes = dsn, keep_for, rate_delay, max_bytes
        self._wake.set()  # more slots, perhaps
        return asyncio.gather(*self._attempts, return_exceptions=True)

    # --- intake -----------------------------------------------------------------------------
    def submit(self, copies: list[Copy]) -> None:
        """Schedule copies the store has committed (new mail, a DSN). Wakes the
        loop at once. A copy due beyond the horizon is left to the store (read when it nears)."""
        now = self.clock()
        for copy in copies:
            if copy.state != "queued" or copy.id in self._copies:
                continue  # final, or already known (a read races with new mail)
            if self._keeps(copy, now):
                self._schedule(copy)
            else:
                self._leave(copy)
        self._trim(now)
        self._wake.set()

    def flush(self) -> None:
        """Every queued copy is due now (`maildetour queue flush`, SIGUSR1); the
        queue is read again first. Detour deadlines still count from the first failure."""
        self._flush_requested = True
        self._wake.set()

    def reload(self) -> None:
        """Read the queue again (SIGUSR2, after `queue hold|release|delete|requeue|flush ID`):
        copies queued in the store meanwhile are scheduled, copies no longer queued there are
        dropped, and known copies made due earlier there are rescheduled."""
        self._reload_requested = True
        self._wake.set()

    async def report(self, copy: Copy, outcome: Outcome) -> None:
        """An outcome that arrived after the fact: a late bounce about a copy we delivered."""
        if copy.id in self._copies:
            return  # already queued again (an earlier report about it)
        copy = self._add(copy)
        token = self._busy[copy.id] = object()
        try:
            await self._settle(copy, outcome, token)
        finally:
            self._free([copy], token)

    async def _read(self) -> None:
        """Hold the queued copies due within the horizon, soonest first, at most `active_limit`
        (`Store.due`): at start-up, on a reload, when the horizon nears or memory runs low. Held
        copies the store no longer has among those are dropped (the operator held or deleted
        them, or they are now beyond the horizon); new ones are held; known ones the operator
        made due earlier are rescheduled. A copy in an attempt, or held or rescheduled while the
        read was on its way, is kept as it is here: the read may predate it. A copy forgotten
        meanwhile is not taken back: the read may predate the update that finished it."""
        self._reload_requested = False
        now = self.clock()
        dropped: set[int] = set()
        self._dropping.append(dropped)
        self._arrived, self._evicted = set(), None
        try:
            found = await self.store.due(now + self.horizon, self.active_limit)
            arrived, evicted = self._arrived, self._evicted
        finally:
            self._dropping.remove(dropped)
            self._arrived = self._evicted = None
        ids = {c.id for c in found.copies}
        for copy in [c for c in self._copies.values()
                     if c.id not in ids and c.id not in self._busy and c.id not in arrived]:
            self._forget(copy)
        self._due_earlier(found.copies)
        for copy in found.copies:
            if copy.id not in dropped and copy.id not in self._copies:
                self._schedule(copy)
        if len(found.copies) >= self.active_limit:  # the rest start right after the last one read
            last = found.copies[-1]
            horizon: _Key = (last.next_at, last.id + 1)
        else:
            horizon = (now + self.horizon, 0)
        self._horizon = horizon if evicted is None else min(horizon, evicted)
        self._later = found.later
        self._read_at = math.inf
        self._plan_read(now)
        self._trim(now)

    def _should_read(self, now: float) -> bool:
        """The horizon nears, or it has passed (a backlog larger than `active_limit`) and half
        of the copies held are done."""
        return now >= self._read_at or (self._horizon[0] <= now and len(self._copies) <= self.active_limit // 2)

    def _plan_read(self, now: float) -> None:
        """Read again halfway to the horizon (not sooner than `_READ_GAP`); a horizon already
        passed waits for memory to run low instead."""
        if self._horizon[0] > now:
            self._read_at = min(self._read_at, now + max((self._horizon[0] - now) / 2, _READ_GAP))

    def _keeps(self, copy: Copy, now: float) -> bool:
        """Is a queued copy held here? Yes below the horizon; beyond it too when it is due now
        and there is room (new mail goes at once even behind a backlog read only in part)."""
        return (copy.next_at, copy.id) < self._horizon or (copy.next_at <= now
                                                           and len(self._copies) < self.active_limit)

    def _trim(self, now: float) -> None:
        """Above `active_limit` (a burst of new mail): the copies due last (not in an attempt)
        are left to the store, down to nine tenths of the limit (so that the next few new
        copies do not trim again), and the horizon comes down to them."""
        excess = len(self._copies) - self.active_limit
        if excess <= 0:
            return
        idle = (c for c in self._copies.values() if c.id not in self._busy)
        for copy in heapq.nlargest(excess + self.active_limit // 10, idle, key=lambda c: (c.next_at, c.id)):
            self._leave(copy)
        self._plan_read(now)

    def _due_earlier(self, stored: Iterable[Copy]) -> None:
        """Known copies the operator made due earlier in the store (`queue flush ID|--dest`) are
        rescheduled. Only a copy whose attempts and target the store agrees on: one whose last
        attempt's update has not committed yet shows an older due time there, not a flush."""
        for copy in stored:
            known = self._copies.get(copy.id)
            if (known is not None and copy.id not in self._busy and copy.next_at < known.next_at
                    and (copy.attempts, copy.target) == (known.attempts, known.target)):
                self._schedule(replace(known, next_at=copy.next_at))

    def _mark_started(self, group: list[Copy]) -> None:
        """Tell the store these copies are in an attempt (for `queue delete`); nothing waits
        for it: the attempt starts at once."""
        self.store.started([c.id for c in group], self.clock())

    async def _flush(self) -> None:
        """Every queued copy due now: those in the store only there (no second "flushed" event
        after `queue flush` did it), then the queue is read again and the held ones follow."""
        self._flush_requested = False
        now = self.clock()
        await self.store.flush(now, later_only=True)
        await self._read()
        for copy in list(self._copies.values()):
            if copy.next_at > now and copy.id not in self._busy:
                self._schedule(replace(copy, next_at=now))
        log.info("queue flushed: %d copies due now", len(self._copies) + self._later)

    async def _listen(self) -> None:
        """Hear the other nodes (`Store.listen`; one node: returns at once). A listener that
        fails is started again after a pause: meanwhile the periodic reads still see the queue."""
        while True:
            try:
                await self.store.listen(self.reload, self.flush)
                return
            except Exception:
                log.exception("listening for other nodes failed; again in %.0fs", _STORE_RECHECK)
                await asyncio.sleep(_STORE_RECHECK)

    async def _refresh_oldest(self) -> None:
        """For the age gauge. A store that cannot answer now keeps the last answer a while
        (a gauge is no reason to pause deliveries)."""
        self._oldest_wanted = False
        at, stored = self.clock(), self._oldest_stored[1]
        try:
            stored = await self.store.oldest_queued()
        except (OSError, sqlite3.Error) as error:
            log.warning("the age of the oldest queued copy could not be read: %s", error)
        self._oldest_stored = (at, stored)

    async def run(self) -> None:
        self._reload_requested = True  # the first turn reads the queue (guarded like any read)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._listen())
            while True:
                self._wake.clear()
                if not self._store_down:  # while it is, the store is read again once it can write
                    flushing = self._flush_requested
                    try:
                        if flushing:
                            await self._flush()
                        elif self._reload_requested or self._should_read(self.clock()):
                            await self._read()
                        if self._oldest_wanted:
                            await self._refresh_oldest()
                    except (OSError, sqlite3.Error) as error:  # a read batched with failing writes
                        self._flush_requested = flushing
                        self._store_failed([], error)
                if len(self._heap) > 2 * len(self._copies) + _HEAP_SLACK:
                    self._compact()
                # Dispatch no more than there are free slots: a drained backlog of 100,000 due
                # copies must not become 100,000 waiting tasks (memory); the rest stay in the
                # heap and go out as attempts finish (each one wakes this loop).
                free = self.max_parallel - self._running
                if self._store_down and self._store_still_down():
                    free = 0
                for group in self._due_groups(self.clock(), free):
                    token = object()
                    self._busy.update((c.id, token) for c in group)
                    self._running += 1
                    self._bytes += group[0].size
                    attempt = tasks.create_task(self._attempt(group, token))
                    self._attempts.add(attempt)
                    attempt.add_done_callback(self._attempts.discard)
                full = self.max_bytes > 0 and self._bytes >= self.max_bytes
                if self._store_down:
                    timeout: float | None = self.store_recheck
                else:
                    # A finishing attempt wakes us; so does the next due copy, and the next read.
                    waiting = self._running >= self.max_parallel or (full and self._running)
                    until = min(math.inf if waiting or not self._heap else self._heap[0][0], self._read_at)
                    timeout = None if until == math.inf else max(until - self.clock(), 0.0)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass

    def _store_still_down(self) -> bool:
        problem = self.store.health()
        if problem is None:
            log.info("the queue can be written again; deliveries resume")
            self._store_down = False
            self._reload_requested = True  # what failed meanwhile is read again
            self._wake.set()
        return problem is not None

    def _due_groups(self, now: float, limit: int) -> list[list[Copy]]:
        """Up to `limit` groups of due copies (one message, one agent, one batch key each)."""
        groups: dict[_Group, list[Copy]] = {}
        taken: set[int] = set()
        in_flight: list[tuple[float, int, int]] = []
        held = self._bytes
        while self._heap and self._heap[0][0] <= now:
            full = len(groups) >= limit or (self.max_bytes > 0 and held >= self.max_bytes
                                            and (groups or self._running))
            if full and (self._heap[0][2] not in self._copies
                         or self._group(self._copies[self._heap[0][2]]) not in groups):
                break
            entry = heapq.heappop(self._heap)
            due, _, copy_id = entry
            copy = self._copies.get(copy_id)
            if copy is None or copy_id in taken or copy.next_at > due:
                continue  # finished, taken, or rescheduled (a later entry exists)
            if copy_id in self._busy:  # rescheduled while its attempt settles: due once it has
                in_flight.append(entry)
                continue
            key = self._group(copy)
            if key not in groups and self.rate_delay > 0:
                destination = self._destination(copy)
                start = self._next_start.get(destination or "", 0.0) if destination else 0.0
                if start > now:  # paced: this destination's next delivery may start then
                    in_flight.append((start, entry[1], copy_id))
                    continue
                if destination:
                    self._next_start[destination] = now + self.rate_delay
            taken.add(copy_id)
            if key not in groups:
                held += copy.size
            groups.setdefault(key, []).append(copy)
        for entry in in_flight:
            heapq.heappush(self._heap, entry)
        return list(groups.values())

    def _destination(self, copy: Copy) -> str | None:
        """What paces and throttles apply to: the recipient domain, or the IMAP account; None
        for our own mailboxes."""
        match self.table.kind(copy.target):
            case "local":
                return None
            case "imap":
                return copy.target
            case _:
                return copy.target.rpartition("@")[2].lower()

    def _group(self, copy: Copy) -> _Group:
        """A hidden copy travels alone: no receiver sees it beside another address."""
        kind = self.table.kind(copy.target)
        hidden = copy.hidden or self.table.is_hidden(copy.target)
        return copy.queue_id, kind, copy.target if hidden else self.agents[kind].batch_key(copy.target)

    # --- one attempt ------------------------------------------------------------------------
    async def _attempt(self, group: list[Copy], token: object) -> None:
        """Deliver one group and settle every copy of it. Whatever goes wrong on our side is
        an outcome too (temporary: the copy is retried, and after its deadline moved on), never
        a silent loop."""
        first, taken = group[0], group
        try:
            group = await self.store.claim(taken, self.clock())
            if len(group) < len(taken):  # another node has them (several nodes): not ours to try
                granted = {c.id for c in group}
                for copy in taken:
                    if copy.id not in granted:
                        self._forget(copy)
                if not group:
                    return
            self._mark_started(group)
            started = self.clock()
            try:
                data = await self.store.read(first.queue_id)
            except FileNotFoundError:
                log.error("message %s has no bytes in the spool; quarantining its copies", first.queue_id)
                for copy in group:
                    await self._quarantine_lost(copy)
                return
            except OSError as error:  # unreadable (EIO, permissions): a temporary failure of ours, with backoff
                log.error("message %s could not be read from the spool: %s", first.queue_id, error)
                unreadable = TemporaryFailure(
                    f"the message could not be read from the spool ({error.strerror or error})",
                    451, "4.3.0", "a temporary problem on the forwarding side")
                outcomes: Mapping[str, Outcome] = {copy.target.lower(): unreadable for copy in group}
            else:
                outcomes = await self._deliver(group, data)
            took = self.clock() - started
            settled = await asyncio.gather(*(self._settle(copy, outcomes.get(copy.target.lower(), _UNKNOWN),
                                                          token, took) for copy in group), return_exceptions=True)
            for failure in [s for s in settled if isinstance(s, BaseException)]:
                raise failure
        except (OSError, sqlite3.Error) as error:  # the store could not write (disk full, I/O error)
            self._store_failed(group, error)
        finally:
            self._running -= 1
            self._bytes -= first.size
            self._free(taken, token)

    def _store_failed(self, copies: list[Copy], error: Exception) -> None:
        """The store could not record what happened to `copies` (a full disk, an I/O error).
        They are dropped from memory and read again from the store, so each is tried again from
        its last recorded state (one that was delivered may go out twice: at-least-once, as
        after a crash). Until the store can write again no attempt starts: a full disk must
        not become a stream of repeated deliveries, nor stop the server."""
        for copy in copies:
            self._forget(copy)
        if not self._store_down:
            log.error("the queue could not be written (%s); deliveries wait until it can", error)
        self._store_down = True
        self._reload_requested = True
        self._wake.set()

    def _free(self, copies: list[Copy], token: object) -> None:
        """The attempt `token` is over for `copies` (unless a later attempt took one already)."""
        for copy in copies:
            if self._busy.get(copy.id) is token:
                del self._busy[copy.id]
        self._wake.set()

    async def _deliver(self, group: list[Copy], data: bytes) -> dict[str, Outcome]:
        first = group[0]
        recipients = tuple(dict.fromkeys(c.target for c in group))
        destination = self._destination(first)
        throttle = self._throttles.get(destination or "")
        if throttle is not None and throttle.until > self.clock():  # not tried: no storm of retries
            until = datetime.fromtimestamp(throttle.until, timezone.utc).strftime("%H:%M:%SZ")
            waiting = TemporaryFailure(f"not tried: {destination} asked us to slow down (until {until})",
                                       451, "4.7.0", "the receiving system asked us to slow down")
            return {target.lower(): waiting for target in recipients}
        try:
            agent = self.agents[self.table.kind(first.target)]
            job = Job(first.queue_id, first.mail_from, recipients, data, first.received_at)
            reported = await agent.deliver(job)
        except Exception as exc:  # a bug, or trouble no agent mapped: temporary, and recorded
            log.exception("delivery of %s failed unexpectedly", first.queue_id)
            failed = TemporaryFailure(f"internal error while delivering ({type(exc).__name__}); see the server log",
                                      451, "4.3.0", "a temporary problem on the forwarding side")
            return {target.lower(): failed for target in recipients}
        if destination is not None:
            self._feedback(destination, reported.values())
        return {target.lower(): outcome for target, outcome in reported.items()}

    def _feedback(self, destination: str, outcomes: Iterable[Outcome]) -> None:
        """A destination that says we send too fast waits, longer each time it says so again;
        one that takes a copy is back to normal."""
        found = list(outcomes)
        if any(isinstance(o, TemporaryFailure) and o.slow_down for o in found):
            known = self._throttles.get(destination)
            delay = min(known.delay * 2, self.retry.longest) if known is not None else self.retry.first
            self._throttles[destination] = _Throttle(self.clock() + delay, delay)
            log.warning("%s asked us to slow down: nothing goes there for %.0fs", destination, delay)
        elif any(isinstance(o, Delivered) for o in found):
            self._throttles.pop(destination, None)

    async def _settle(self, copy: Copy, outcome: Outcome, token: object, took: float = 0.0) -> None:
        """Decide, and write the decision with its events. A copy that stays queued (a retry,
        or its next detour step, due now) is scheduled before its record commits: the next
        step starts at once, and its own record is queued behind this one (the store commits
        in order)."""
        now = self.clock()
        attempted = Attempted(copy.target, copy.origin, copy.hidden, copy.mail_from == "",
                              copy.attempts + 1, copy.first_failure)
        throttle = self._throttles.get(self._destination(copy) or "")
        not_before = throttle.until if throttle is not None and throttle.until > now else None
        decision = decide(attempted, outcome, now, self.table.destinations, self.retry, not_before)
        events = _outcome_events(copy, outcome, now, copy.attempts + 1)
        updated = await self._apply(copy, decision, now, events)
        _log_delivery(copy, outcome, decision, now, took)
        if self.metrics is not None:
            self.metrics.settled(_STATUS[type(decision)], copy.target, outcome, latency=now - copy.received_at,
                                 detours=copy.detours)
        committed = self.store.update(updated, events)
        held = updated.state == "queued" and self._keeps(updated, now)
        if held:
            self._schedule(updated)
            self._free([copy], token)
        if not await committed:
            log.info("copy #%d of %s was held or deleted by the operator meanwhile", copy.id, copy.queue_id)
            self._forget(copy)
        elif updated.state != "queued":
            await self._finish_copy(updated)
        elif not held:  # due beyond the horizon: the store has it now (unless a read moved the horizon)
            if self._keeps(updated, self.clock()):
                self._schedule(updated)
            else:
                self._leave(updated)

    async def _apply(self, copy: Copy, decision: Decision, now: float, events: list[Event]) -> Copy:
        def note(kind: EventKind, target: str, detail: str) -> None:
            events.append(Event(now, copy.queue_id, copy.id, kind, target, detail))

        attempts = copy.attempts + 1
        match decision:
            case Done():
                return replace(copy, state="delivered", attempts=attempts)
            case Retry(at=at, first_failure=first):
                return replace(copy, state="queued", attempts=attempts, next_at=at, first_failure=first)
            case Detour(to=to, reason=reason, hidden=hidden):
                note("detoured", to, f"from {copy.target}: {reason}")
                return replace(copy, state="queued", target=to, hidden=hidden, attempts=0, next_at=now,
                               first_failure=None, detours=copy.detours + 1)
            case Quarantine(reason=reason):
                note("quarantined", copy.target, reason)
                return replace(copy, state="quarantined", attempts=attempts)
            case Fail(reason=reason):
                note("failed", copy.target, reason)
                return replace(copy, state="failed", attempts=attempts)
            case Bounce(reason=reason, outcome=outcome):
                note("bounced", copy.target, reason)
                dsn_id, made = await self.dsn.bounce(copy, outcome, now)
                self.submit(made)
                note("dsn-sent", copy.mail_from, f"DSN {dsn_id} to the sender names {copy.recipient} only")
                return replace(copy, state="bounced", attempts=attempts)
        raise AssertionError(f"unknown decision {decision!r}")

    async def _quarantine_lost(self, copy: Copy) -> None:
        held = replace(copy, state="quarantined")
        if self.metrics is not None:
            self.metrics.settled("quarantined", copy.target)
        await self.store.update(held, [Event(self.clock(), copy.queue_id, copy.id, "quarantined", copy.target,
                                             "message bytes missing from the spool")])
        await self._finish_copy(held)

    # --- what the queue looks like (metrics, at scrape time) ----------------------------------
    def queue_depth(self) -> int:
        """Queued copies: held here (due, waiting to retry, or in an attempt) and in the store
        only (as counted at the last read, plus those left there since)."""
        return len(self._copies) + self._later

    def oldest_age(self) -> float:
        """Seconds since the oldest queued copy's message was accepted (0: none queued). With
        copies in the store only, its answer (`Store.oldest_queued`) is at most `_OLDEST_FOR`
        seconds old: an older one is asked for, and the next scrape has it."""
        now = self.clock()
        oldest = min((c.received_at for c in self._copies.values()), default=math.inf)
        if self._later:
            at, stored = self._oldest_stored
            if now - at > _OLDEST_FOR or now < at:
                self._oldest_wanted = True
                self._wake.set()
            if stored is not None:
                oldest = min(oldest, stored)
        return 0.0 if oldest == math.inf else max(now - oldest, 0.0)

    # --- bookkeeping ------------------------------------------------------------------------
    def _add(self, copy: Copy) -> Copy:
        """Hold a copy (or its new state); returns it as held. A copy new here has its strings
        interned: copies of one message share the queue id and sender, and targets repeat."""
        if copy.id not in self._copies:
            copy = replace(copy, queue_id=sys.intern(copy.queue_id), mail_from=sys.intern(copy.mail_from),
                           recipient=sys.intern(copy.recipient), target=sys.intern(copy.target),
                           origin=sys.intern(copy.origin))
            self._by_message[copy.queue_id] = self._by_message.get(copy.queue_id, 0) + 1
        self._copies[copy.id] = copy
        if self._arrived is not None:
            self._arrived.add(copy.id)
        return copy

    def _schedule(self, copy: Copy) -> None:
        copy = self._add(copy)
        heapq.heappush(self._heap, (copy.next_at, next(self._seq), copy.id))

    def _leave(self, copy: Copy) -> None:
        """A queued copy (committed as it is) is left to the store, beyond the horizon: read
        again when its time nears."""
        self._forget(copy)
        self._later += 1
        key = (copy.next_at, copy.id)
        self._horizon = min(self._horizon, key)
        if self._arrived is not None:  # a read is on its way: its horizon stays below this one
            self._evicted = key if self._evicted is None else min(self._evicted, key)

    def _compact(self) -> None:
        """Drop the heap's entries of copies no longer held (left to the store, final)."""
        self._heap = [e for e in self._heap if (c := self._copies.get(e[2])) is not None and c.next_at <= e[0]]
        heapq.heapify(self._heap)

    def _forget(self, copy: Copy) -> bool:
        """Drop a copy from memory; True when it was its message's last one here."""
        if self._copies.pop(copy.id, None) is None:
            return False
        for dropped in self._dropping:
            dropped.add(copy.id)
        remaining = self._by_message.get(copy.queue_id, 0) - 1
        if remaining > 0:
            self._by_message[copy.queue_id] = remaining
            return False
        self._by_message.pop(copy.queue_id, None)
        return True

    async def _finish_copy(self, copy: Copy) -> None:
        """A copy is final. When it was its message's last one held here, the message is
        finished unless the store still has one of its copies queued (left there, beyond the
        horizon: the last of those to become final finishes it)."""
        if self._forget(copy):
            # A DSN may come back to the SRS sender later: keep the bytes for a detour then.
            keep = self.keep_for is not None and copy.mail_from != ""
            keep_until = self.clock() + self.keep_for if keep else None  # type: ignore[operator]
            await self.store.finish_if_done(copy.queue_id, keep_until)


_STORE_RECHECK = 5.0  # seconds between looks at a store that could not write
_READ_GAP = 1.0  # seconds at least between two reads planned by the horizon (not a read storm)
_OLDEST_FOR = 5.0  # seconds the store's oldest queued copy is taken as known (the age gauge)
_HEAP_SLACK = 1024  # heap entries of copies no longer held tolerated before a compaction
_UNKNOWN = TemporaryFailure("no outcome reported for this recipient")
# What the server log calls each decision (Postfix's status=).
_STATUS = {Done: "sent", Retry: "deferred", Detour: "detoured", Quarantine: "quarantined", Bounce: "bounced",
           Fail: "failed"}


def _log_delivery(copy: Copy, outcome: Outcome, decision: Decision, now: float, took: float) -> None:
    """One line per attempt's outcome, like Postfix's "status=sent" lines."""
    fields = {"queue_id": copy.queue_id, "copy": copy.id, "to": copy.target, "orig_to": copy.recipient,
              "relay": outcome.relay or "none", "delay": round(now - copy.received_at, 3),
              "attempt_time": round(took, 3), "connect_time": round(outcome.connect, 3),
              "transfer_time": round(max(took - outcome.connect, 0.0), 3), "attempt": copy.attempts + 1,
              "dsn": outcome.status,
              "status": _STATUS[type(decision)]}
    if isinstance(decision, Detour):
        fields["next"] = decision.to
    fields["reply"] = outcome.reason
    log.info("%s: %s", copy.queue_id, fields["status"], extra={"fields": fields})


def _outcome_events(copy: Copy, outcome: Outcome, now: float, attempt: int) -> list[Event]:
    match outcome:
        case Delivered():
            kind: EventKind = "delivered"
        case TemporaryFailure() | Unreachable():
            kind = "deferred"
        case PermanentFailure():
            kind = "refused"
    detail = f"unreachable: {outcome.reason}" if isinstance(outcome, Unreachable) else outcome.reason
    events = [Event(now, copy.queue_id, copy.id, kind, copy.target, f"attempt {attempt}: {detail}")]
    if isinstance(outcome, PermanentFailure) and outcome.alert:
        events.append(Event(now, copy.queue_id, copy.id, "alert", copy.target,
                            f"{outcome.public} ({outcome.code} {outcome.status}): check this destination"))
    return events
