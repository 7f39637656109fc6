"""The scheduler (Postfix's qmgr): every copy is tried at once, retried later, detoured.

Internal. It only schedules: `submit` is called right after a message is committed (no polling
tick); due copies of one message that the same agent may deliver together (its `batch_key`) go
out as one job; the agent reports an outcome per copy; `core.policy` decides; the decision
and its events are written to the store. What a decision needs done elsewhere is done there:
a private DSN by `bounces.DsnWriter`, signing and `skip_when` by the agents in front of the SMTP
agent. On start-up every queued copy is loaded again, so what was in flight before a crash is
simply tried again (at-least-once); `flush` makes every queued copy due now and `reload` picks
up what the operator changed (held, deleted, released, requeued, flushed copies). Each attempt's
copies are marked in the store when it starts (so `queue delete` can refuse them). At most
`max_parallel_attempts` attempts run at once. Message bytes come from the store (which keeps
recent ones in memory).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import sqlite3
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


@dataclass(slots=True)
class _Throttle:
    """A destination that said we send too fast: nothing goes there before `until`."""

    until: float
    delay: float  # how long this time; doubles while the destination keeps saying so


class Scheduler:
    def __init__(self, *, store: Store, table: RoutingTable, agents: Mapping[Kind, Agent],
                 retry: RetryRules, max_parallel: int, dsn: DsnWriter, keep_for: float | None,
                 clock: Callable[[], float], rate_delay: float = 0.0, max_bytes: int = 0,
                 metrics: Metrics | None = None) -> None:
        """`keep_for`: how long a finished message's bytes stay for late bounces (None: not
        kept, when nothing can come back to an SRS address of ours). `rate_delay`: least time
        between two deliveries to one destination (0: none). `max_bytes`: message bytes that
        attempts in flight may hold at once (0: no limit; one attempt always goes). `metrics`:
        where each attempt's result is counted (None: nowhere)."""
        self.store, self.table, self.agents, self.dsn, self.metrics = store, table, agents, dsn, metrics
        self.retry, self.max_parallel, self.keep_for, self.clock = retry, max_parallel, keep_for, clock
        self.rate_delay, self.max_bytes = rate_delay, max_bytes
        self._bytes = 0  # message bytes held by attempts in flight
        self._throttles: dict[str, _Throttle] = {}  # destination -> asked us to slow down
        self._next_start: dict[str, float] = {}  # destination -> earliest next delivery (pacing)
        self._heap: list[tuple[float, int, int]] = []  # (due, tie-breaker, copy id)
        self._seq = itertools.count()
        self._copies: dict[int, Copy] = {}  # every queued copy
        self._by_message: dict[str, set[int]] = {}  # queue id -> its queued copies
        # Copies in an attempt, each with the attempt's token: an attempt frees only its own.
        self._busy: dict[int, object] = {}
        self._wake = asyncio.Event()
        self._running = 0  # attempts in flight
        self._attempts: set[asyncio.Task[None]] = set()  # the same, as tasks (a reload waits for them)
        self._flush_requested = self._reload_requested = False
        self._store_down = False  # a write failed: no attempt starts until `store.health()` is fine
        self.store_recheck = _STORE_RECHECK

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
        """Schedule copies (new, or loaded at start-up). Wakes the loop at once."""
        for copy in copies:
            if copy.state != "queued" or copy.id in self._copies:
                continue  # final, or already known (start-up loading races with new mail)
            self._copies[copy.id] = copy
            self._by_message.setdefault(copy.queue_id, set()).add(copy.id)
            heapq.heappush(self._heap, (copy.next_at, next(self._seq), copy.id))
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
        self._by_message.setdefault(copy.queue_id, set()).add(copy.id)
        self._copies[copy.id] = copy
        token = self._busy[copy.id] = object()
        try:
            await self._settle(copy, outcome, token)
        finally:
            self._free([copy], token)

    async def _reload(self) -> None:
        self._reload_requested = False
        queued = await self.store.unfinished()
        ids = {c.id for c in queued}
        for copy in [c for c in self._copies.values() if c.id not in ids and c.id not in self._busy]:
            self._forget(copy)
        self._due_earlier(queued)
        self.submit(queued)  # known copies are skipped

    def _due_earlier(self, stored: list[Copy]) -> None:
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
        self._flush_requested = False
        await self._reload()
        now = self.clock()
        for copy in list(self._copies.values()):
            if copy.next_at > now and copy.id not in self._busy:
                self._schedule(replace(copy, next_at=now))
        log.info("queue flushed: %d copies due now", len(self._copies))

    async def run(self) -> None:
        self.submit(await self.store.unfinished())
        async with asyncio.TaskGroup() as tasks:
            while True:
                self._wake.clear()
                if self._flush_requested:
                    await self._flush()
                elif self._reload_requested:
                    await self._reload()
                # Dispatch no more than there are free slots: a drained backlog of 100,000 due
                # copies must not become 100,000 waiting tasks (memory); the rest stay in the
                # heap and go out as attempts finish (each one wakes this loop).
                free = self.max_parallel - self._running
                if self._store_down and self._store_still_down():
                    free = 0
                for group in self._due_groups(self.clock(), free):
                    token = object()
                    self._busy.update((c.id, token) for c in group)
                    self._mark_started(group)
                    self._running += 1
                    self._bytes += group[0].size
                    attempt = tasks.create_task(self._attempt(group, token))
                    self._attempts.add(attempt)
                    attempt.add_done_callback(self._attempts.discard)
                full = self.max_bytes > 0 and self._bytes >= self.max_bytes
                if self._store_down:
                    timeout = self.store_recheck
                elif self._running >= self.max_parallel or (full and self._running):
                    timeout = None  # a finishing attempt wakes us
                else:
                    timeout = max(self._heap[0][0] - self.clock(), 0.0) if self._heap else None
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
        first = group[0]
        try:
            try:
                data = await self.store.read(first.queue_id)
            except FileNotFoundError:
                log.error("message %s has no bytes in the spool; quarantining its copies", first.queue_id)
                for copy in group:
                    await self._quarantine_lost(copy)
                return
            started = self.clock()
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
            self._free(group, token)

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
        if updated.state == "queued":
            self._schedule(updated)
            self._free([copy], token)
        if not await committed:
            log.info("copy #%d of %s was held or deleted by the operator meanwhile", copy.id, copy.queue_id)
            self._forget(copy)
        elif updated.state != "queued":
            await self._finish_copy(updated)

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
        """Copies queued here: due, waiting to retry, or in an attempt."""
        return len(self._copies)

    def oldest_age(self) -> float:
        """Seconds since the oldest queued copy's message was accepted (0: none queued)."""
        if not self._copies:
            return 0.0
        return max(self.clock() - min(c.received_at for c in self._copies.values()), 0.0)

    # --- bookkeeping ------------------------------------------------------------------------
    def _schedule(self, copy: Copy) -> None:
        self._copies[copy.id] = copy
        heapq.heappush(self._heap, (copy.next_at, next(self._seq), copy.id))

    def _forget(self, copy: Copy) -> bool:
        """Drop a copy from memory; True when it was its message's last one here."""
        self._copies.pop(copy.id, None)
        remaining = self._by_message.get(copy.queue_id)
        if remaining is None:
            return False
        remaining.discard(copy.id)
        if remaining:
            return False
        del self._by_message[copy.queue_id]
        return True

    async def _finish_copy(self, copy: Copy) -> None:
        if self._forget(copy):
            # A DSN may come back to the SRS sender later: keep the bytes for a detour then.
            keep = self.keep_for is not None and copy.mail_from != ""
            await self.store.finish(copy.queue_id, self.clock() + self.keep_for if keep else None)  # type: ignore[operator]


_STORE_RECHECK = 5.0  # seconds between looks at a store that could not write
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
