"""The scheduler: delivers every copy at once, retries later, detours, bounces privately.

Internal. `submit` is called right after a message is committed (no polling tick); due copies of
one message that share a next hop go out as one job. Agents report outcomes; `core.policy`
decides; the decision and its events are written to the store. On start-up every queued copy is
loaded again, so what was in flight before a crash is simply tried again (at-least-once).
Message bytes stay in memory only while a copy of the message is due now; deferred copies
re-read the spool when their retry comes. At most MAX_PARALLEL_ATTEMPTS attempts run at once.
With `[signing]`, SMTP copies go out through `Outgoing` (SRS, DKIM, ARC), and DSNs that come
back to our SRS addresses are matched to their copy here (`late_bounce`). A destination's
`skip_when` is applied before it is tried.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from dataclasses import replace
from typing import Callable, Mapping

from maildetour.config.model import DeliveryConfig
from maildetour.core.authres import find_results, skip_reason, verdict_words
from maildetour.core.bounce_report import parse_bounce
from maildetour.core.dsn import Failure, build_dsn
from maildetour.core.outcome import Delivered, Outcome, PermanentFailure, TemporaryFailure, Unreachable
from maildetour.core.policy import Attempted, Bounce, Decision, Detour, Done, Fail, Quarantine, Retry, decide
from maildetour.core.received import find_message_id
from maildetour.core.redact import Redactor
from maildetour.core.routing import Kind, RoutingTable
from maildetour.delivery.base import Agent, Job
from maildetour.delivery.outgoing import Outgoing
from maildetour.store.base import Store
from maildetour.store.records import Copy, Event, NewCopy, NewMessage, new_queue_id

log = logging.getLogger("maildetour.delivery")

# Attempts in flight at once, over all next hops (each agent also limits per host).
MAX_PARALLEL_ATTEMPTS = 200
# Keep message bytes in memory when its next retry is this close (seconds).
HOT_WINDOW = 2.0
# How often the bytes kept for late bounces are looked at for removal.
PURGE_INTERVAL = 3600.0


class Scheduler:
    def __init__(self, *, store: Store, table: RoutingTable, agents: Mapping[Kind, Agent],
                 delivery: DeliveryConfig, hostname: str, redactor: Redactor,
                 clock: Callable[[], float], outgoing: Outgoing | None = None,
                 authserv_id: str | None = None) -> None:
        self.store, self.table, self.agents = store, table, agents
        self.outgoing, self.authserv_id = outgoing, authserv_id
        self.delivery, self.hostname, self.redactor, self.clock = delivery, hostname, redactor, clock
        self._heap: list[tuple[float, int, int]] = []  # (due, tie-breaker, copy id)
        self._seq = itertools.count()
        self._copies: dict[int, Copy] = {}  # every queued copy
        self._by_message: dict[str, set[int]] = {}  # queue id -> its queued copies
        self._busy: set[int] = set()
        self._data: dict[str, bytes] = {}
        self._wake = asyncio.Event()
        self._running = 0  # attempts in flight
        self._flush_requested = False

    # --- intake -----------------------------------------------------------------------------
    def submit(self, copies: list[Copy], data: bytes | None = None) -> None:
        """Schedule copies (new, or loaded at start-up). Wakes the loop at once."""
        for copy in copies:
            if copy.state != "queued" or copy.id in self._copies:
                continue  # final, or already known (start-up loading races with new mail)
            self._copies[copy.id] = copy
            self._by_message.setdefault(copy.queue_id, set()).add(copy.id)
            heapq.heappush(self._heap, (copy.next_at, next(self._seq), copy.id))
            if data is not None:
                self._data[copy.queue_id] = data
        self._wake.set()

    def flush(self) -> None:
        """Every queued copy is due now (`maildetour queue --flush|--release`, SIGUSR1); copies
        queued in the store meanwhile (released from quarantine) are loaded first. Detour
        deadlines still count from the first failure."""
        self._flush_requested = True
        self._wake.set()

    async def _flush(self) -> None:
        self._flush_requested = False
        self.submit(await self.store.unfinished())  # known copies are skipped
        now = self.clock()
        for copy in list(self._copies.values()):
            if copy.next_at > now and copy.id not in self._busy:
                self._schedule(replace(copy, next_at=now))
        log.info("queue flushed: %d copies due now", len(self._copies))

    async def run(self) -> None:
        self.submit(await self.store.unfinished())
        async with asyncio.TaskGroup() as tasks:
            if self.outgoing is not None:
                tasks.create_task(self._purge_loop())
            while True:
                self._wake.clear()
                if self._flush_requested:
                    await self._flush()
                # Dispatch no more than there are free slots: a drained backlog of 100,000 due
                # copies must not become 100,000 waiting tasks (memory); the rest stay in the
                # heap and go out as attempts finish (each one wakes this loop).
                free = MAX_PARALLEL_ATTEMPTS - self._running
                for group in self._due_groups(self.clock(), free):
                    self._busy.update(c.id for c in group)
                    self._running += 1
                    tasks.create_task(self._attempt(group))
                if self._running >= MAX_PARALLEL_ATTEMPTS:
                    timeout = None  # a finishing attempt wakes us
                else:
                    timeout = max(self._heap[0][0] - self.clock(), 0.0) if self._heap else None
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass

    def _due_groups(self, now: float, limit: int) -> list[list[Copy]]:
        """Up to `limit` groups of due copies (one message, one kind, one domain each)."""
        groups: dict[tuple[str, str, str], list[Copy]] = {}
        taken: set[int] = set()
        while self._heap and self._heap[0][0] <= now:
            if len(groups) >= limit and (self._heap[0][2] not in self._copies
                                         or self._group_key(self._copies[self._heap[0][2]]) not in groups):
                break
            due, _, copy_id = heapq.heappop(self._heap)
            copy = self._copies.get(copy_id)
            if copy is None or copy_id in self._busy or copy_id in taken or copy.next_at > due:
                continue  # finished, in flight, taken, or rescheduled (a later entry exists)
            taken.add(copy_id)
            groups.setdefault(self._group_key(copy), []).append(copy)
        return list(groups.values())

    def _group_key(self, copy: Copy) -> tuple[str, str, str]:
        kind = self.table.kind(copy.target)
        return copy.queue_id, kind, copy.target.rsplit("@", 1)[-1] if kind == "smtp" else ""

    # --- one attempt ------------------------------------------------------------------------
    async def _attempt(self, group: list[Copy]) -> None:
        queue_id = group[0].queue_id
        try:
            outcomes = await self._deliver(group)
            for copy in group:
                await self._settle(copy, outcomes.get(copy.target.lower(), _UNKNOWN))
        except FileNotFoundError:
            log.error("message %s has no bytes in the spool; quarantining its copies", queue_id)
            for copy in group:
                await self._quarantine_lost(copy)
        except Exception:
            log.exception("delivery of %s failed unexpectedly; retrying later", queue_id)
            for copy in group:
                self._schedule(replace(copy, next_at=self.clock() + self.delivery.retry_first))
        finally:
            self._running -= 1
            self._busy.difference_update(c.id for c in group)
            self._cool(queue_id)
            self._wake.set()

    async def _deliver(self, group: list[Copy]) -> Mapping[str, Outcome]:
        copy = group[0]
        data = self._data.get(copy.queue_id)
        if data is None:
            data = await self.store.read(copy.queue_id)
            self._data[copy.queue_id] = data
        kind = self.table.kind(copy.target)
        skipped = self._skipped(group, data) if kind == "smtp" else {}
        recipients = tuple(t for t in dict.fromkeys(c.target for c in group) if t.lower() not in skipped)
        if not recipients:
            return skipped
        mail_from = copy.mail_from
        if kind == "smtp" and self.outgoing is not None:
            prepared = await self.outgoing.prepare(mail_from, data)
            mail_from, data = prepared.mail_from, prepared.data
        outcomes = await self.agents[kind].deliver(Job(copy.queue_id, mail_from, recipients, data))
        return {**skipped, **{target.lower(): outcome for target, outcome in outcomes.items()}}

    def _skipped(self, group: list[Copy], data: bytes) -> dict[str, Outcome]:
        """Copies whose destination's `skip_when` the inbound verdicts meet: not even tried."""
        if self.authserv_id is None:
            return {}
        words: dict[str, str] | None = None
        result: dict[str, Outcome] = {}
        for copy in group:
            dest = self.table.destinations.get(copy.target.lower())
            if dest is None or not dest.skip_when:
                continue
            if words is None:
                words = verdict_words(find_results(data, self.authserv_id))
            if (reason := skip_reason(dest.skip_when, words)) is not None:
                result[copy.target.lower()] = PermanentFailure(f"not tried: {reason} (skip_when)")
        return result

    async def _settle(self, copy: Copy, outcome: Outcome) -> None:
        now = self.clock()
        attempted = Attempted(copy.target, copy.hidden_origin, copy.mail_from == "",
                              copy.attempts + 1, copy.first_failure)
        decision = decide(attempted, outcome, now, self.table.destinations, self.delivery)
        events = [_outcome_event(copy, outcome, now, copy.attempts + 1)]
        updated = await self._apply(copy, decision, now, events)
        await self.store.update(updated, events)
        if updated.state == "queued":
            self._schedule(updated)
        else:
            await self._finish_copy(updated)

    async def _apply(self, copy: Copy, decision: Decision, now: float, events: list[Event]) -> Copy:
        def note(kind: str, target: str, detail: str) -> None:
            events.append(Event(now, copy.queue_id, copy.id, kind, target, detail))  # type: ignore[arg-type]

        attempts = copy.attempts + 1
        match decision:
            case Done():
                return replace(copy, state="delivered", attempts=attempts)
            case Retry(at=at, first_failure=first):
                return replace(copy, state="queued", attempts=attempts, next_at=at, first_failure=first)
            case Detour(to=to, reason=reason):
                note("detoured", to, f"from {copy.target}: {reason}")
                return replace(copy, state="queued", target=to, attempts=0, next_at=now,
                               first_failure=None, detours=copy.detours + 1)
            case Quarantine(reason=reason):
                note("quarantined", copy.target, reason)
                return replace(copy, state="quarantined", attempts=attempts)
            case Fail(reason=reason):
                note("failed", copy.target, reason)
                return replace(copy, state="failed", attempts=attempts)
            case Bounce(reason=reason):
                note("bounced", copy.target, reason)
                dsn_id = await self._send_dsn(copy, reason, now)
                note("dsn-sent", copy.mail_from, f"DSN {dsn_id} to the sender names {copy.recipient} only")
                return replace(copy, state="bounced", attempts=attempts)
        raise AssertionError(f"unknown decision {decision!r}")

    async def _send_dsn(self, copy: Copy, reason: str, now: float) -> str:
        original = self._data.get(copy.queue_id) or await self.store.read(copy.queue_id)
        dsn = build_dsn(hostname=self.hostname, sender=copy.mail_from,
                        failure=Failure(copy.queue_id, copy.recipient, reason, copy.received_at),
                        original=original, redactor=self.redactor, now=now)
        queue_id = new_queue_id(now)
        message = NewMessage(queue_id, "", now, find_message_id(dsn), len(dsn), "maildetour [dsn]")
        event = Event(now, queue_id, None, "accepted", copy.mail_from, f"DSN for {copy.queue_id}")
        made = await self.store.accept(message, dsn, [NewCopy(copy.mail_from, copy.mail_from, False)], [event])
        self.submit(made, dsn)
        return queue_id

    async def _quarantine_lost(self, copy: Copy) -> None:
        held = replace(copy, state="quarantined")
        await self.store.update(held, [Event(self.clock(), copy.queue_id, copy.id, "quarantined", copy.target,
                                             "message bytes missing from the spool")])
        await self._finish_copy(held)

    # --- bookkeeping ------------------------------------------------------------------------
    def _schedule(self, copy: Copy) -> None:
        self._copies[copy.id] = copy
        heapq.heappush(self._heap, (copy.next_at, next(self._seq), copy.id))

    async def _finish_copy(self, copy: Copy) -> None:
        self._copies.pop(copy.id, None)
        remaining = self._by_message.get(copy.queue_id)
        if remaining is not None:
            remaining.discard(copy.id)
            if not remaining:
                del self._by_message[copy.queue_id]
                self._data.pop(copy.queue_id, None)
                # With SRS, a DSN may come back later: keep the bytes for a detour then.
                keep = self.outgoing is not None and copy.mail_from != ""
                await self.store.finish(
                    copy.queue_id, self.clock() + self.delivery.late_bounce_window if keep else None)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            removed = await self.store.purge(self.clock())
            if removed:
                log.info("removed %d messages kept for late bounces", removed)

    # --- late bounces -------------------------------------------------------------------------
    async def late_bounce(self, message: NewMessage, data: bytes, senders: tuple[str, ...]) -> None:
        """A DSN came back to one of our SRS addresses (which decode to `senders`). It is kept
        (for `trace`) but never forwarded. Each failed recipient it names that matches a copy we
        delivered for one of `senders`, and whose bytes we still keep, counts as a refusal of
        that copy (hidden: detour; ordinary: our own private DSN)."""
        now = message.received_at
        report = parse_bounce(data, self.hostname)
        wanted = {s.lower() for s in senders}
        matches: list[tuple[Copy, str]] = []
        for failed in report.failed:
            for queue_id in report.queue_ids:
                copy = await self.store.find_copy(queue_id, failed.address)
                if (copy is not None and copy.state == "delivered" and copy.id not in self._copies
                        and copy.mail_from.lower() in wanted and await self.store.kept(copy.queue_id, now)):
                    matches.append((copy, f"late bounce {message.queue_id}: {failed.status} {failed.diagnostic}"))
        events = [Event(now, message.queue_id, None, "accepted", "", f"DSN to our SRS address; client={message.client}")]
        events += [Event(now, message.queue_id, None, "late-bounce", c.target, f"reports on {c.queue_id} copy #{c.id}")
                   for c, _ in matches]
        if not matches:
            events.append(Event(now, message.queue_id, None, "quarantined", "",
                                "late bounce matched no copy we delivered and still keep; kept, not forwarded"))
        await self.store.accept(message, data, [], events)
        for copy, reply in matches:
            self._by_message.setdefault(copy.queue_id, set()).add(copy.id)
            self._copies[copy.id] = copy
            self._busy.add(copy.id)
            try:
                await self._settle(copy, PermanentFailure(reply))
            finally:
                self._busy.discard(copy.id)
                self._wake.set()


    def _cool(self, queue_id: str) -> None:
        """Drop message bytes from memory unless a copy is in flight or due very soon."""
        soon = self.clock() + HOT_WINDOW
        for copy_id in self._by_message.get(queue_id, ()):
            copy = self._copies.get(copy_id)
            if copy_id in self._busy or (copy is not None and copy.next_at <= soon):
                return
        self._data.pop(queue_id, None)


_UNKNOWN = TemporaryFailure("no outcome reported for this recipient")


def _outcome_event(copy: Copy, outcome: Outcome, now: float, attempt: int) -> Event:
    match outcome:
        case Delivered(reply=reply):
            kind, detail = "delivered", reply
        case TemporaryFailure(reply=reply):
            kind, detail = "deferred", reply
        case Unreachable(reason=reason):
            kind, detail = "deferred", f"unreachable: {reason}"
        case PermanentFailure(reply=reply, alert=alert):
            kind, detail = ("refused", reply + (" [alert: check this destination]" if alert else ""))
    return Event(now, copy.queue_id, copy.id, kind, copy.target, f"attempt {attempt}: {detail}")  # type: ignore[arg-type]
