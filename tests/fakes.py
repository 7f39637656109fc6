"""One in-memory fake per interface: the store and a delivery agent that answers from a script."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Awaitable, Callable, Mapping, Sequence

from maildetour.core.outcome import Outcome
from maildetour.delivery.base import Job
from maildetour.store.listing import BytesGone, InFlight, ListedCopy, ListedMessage, QueueListing, QueueQuery
from maildetour.store.records import Copy, CopyState, DueCopies, Event, Message, NewCopy, Story


class MemoryStore:
    """Implements `store.base.Store` in memory; `fail_accept` makes `accept` raise."""

    def __init__(self) -> None:
        self.messages: dict[str, tuple[Message, bytes]] = {}
        self.copies: dict[int, Copy] = {}
        self.events: list[Event] = []
        self.finished: list[str] = []
        self.keep_until: dict[str, float | None] = {}
        self.fail_accept: Exception | None = None
        self.marks: dict[int, float] = {}  # copies in an attempt (`started`), cleared by `update`
        self.fail_update: Exception | None = None  # `update` fails with this (a full disk)
        self.problem: str | None = None  # what `health` says
        self.fail_read: Exception | None = None  # `read` fails with this (an unreadable spool file)
        self.reads = 0
        self.elsewhere: set[int] = set()  # copies another node holds: `claim` leaves them out
        self.claims: list[list[int]] = []  # the copy ids of each `claim`
        self._next = 1

    async def accept(self, message: Message, data: bytes, copies: Sequence[NewCopy],
                     events: Sequence[Event]) -> list[Copy]:
        if self.fail_accept is not None:
            raise self.fail_accept
        self.messages[message.queue_id] = (message, data)
        self.events += events
        made = []
        for c in copies:
            copy = Copy(self._next, message.queue_id, message.mail_from, c.recipient, c.target, c.target,
                        c.hidden, c.state, 0, message.received_at, None, 0, message.received_at, message.size)
            self._next += 1
            self.copies[copy.id] = copy
            made.append(copy)
            if c.state != "queued":
                self.events.append(Event(message.received_at, message.queue_id, copy.id, c.state,  # type: ignore[arg-type]
                                         c.target, c.why))
        return made

    def health(self) -> str | None:
        return self.problem

    def update(self, copy: Copy, events: Sequence[Event]) -> Awaitable[bool]:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self.fail_update is not None:
            done.set_exception(self.fail_update)
            return done
        self.events += events
        self.marks.pop(copy.id, None)
        done.set_result(self.copies[copy.id].state not in ("held", "deleted"))
        if done.result():
            self.copies[copy.id] = copy
        return done

    async def unfinished(self) -> list[Copy]:
        if self.fail_update is not None:  # a read batched with failing writes fails with them
            raise self.fail_update
        return [c for c in self.copies.values() if c.state == "queued"]

    async def due(self, before: float, limit: int) -> DueCopies:
        if self.fail_update is not None:  # as `unfinished`
            raise self.fail_update
        queued = sorted((c for c in self.copies.values() if c.state == "queued"), key=lambda c: (c.next_at, c.id))
        found = tuple(c for c in queued if c.next_at < before)[:limit]
        return DueCopies(found, len(queued) - len(found))

    async def oldest_queued(self) -> float | None:
        return min((c.received_at for c in self.copies.values() if c.state == "queued"), default=None)

    async def read(self, queue_id: str) -> bytes:
        self.reads += 1
        if self.fail_read is not None:
            raise self.fail_read
        return self.messages[queue_id][1]

    async def finish(self, queue_id: str, keep_until: float | None = None) -> None:
        self.finished.append(queue_id)
        self.keep_until[queue_id] = keep_until

    async def finish_if_done(self, queue_id: str, keep_until: float | None = None) -> bool:
        if any(c.state == "queued" for c in self.copies.values() if c.queue_id == queue_id):
            return False
        await self.finish(queue_id, keep_until)
        return True

    async def find_copy(self, key: str, target: str) -> Copy | None:
        for copy in self.copies.values():
            if key in (copy.queue_id, self.messages[copy.queue_id][0].message_id) and copy.target == target:
                return copy
        return None

    async def kept(self, queue_id: str, now: float) -> bool:
        if queue_id not in self.finished:
            return queue_id in self.messages
        until = self.keep_until.get(queue_id)
        return until is not None and until >= now

    async def purge(self, now: float) -> int:
        gone = [q for q, until in self.keep_until.items() if until is not None and until < now]
        for q in gone:
            self.keep_until[q] = None
        return len(gone)

    # --- retention: finished = in `finished`, at the time of its last event ----------------------
    async def expire_quarantined(self, before: float, now: float, limit: int) -> int:
        old = [c for c in self.copies.values() if c.state == "quarantined" and c.next_at < before][:limit]
        for c in old:
            self.copies[c.id] = replace(c, state="deleted")
            self.events.append(Event(now, c.queue_id, c.id, "deleted", c.target, "quarantine_retention"))
        return len(old)

    async def purge_finished(self, before: float, now: float, limit: int) -> int:
        def done(q: str) -> bool:
            until = self.keep_until.get(q)
            return (q in self.finished and (until is None or until < now)
                    and max((e.at for e in self.events if e.queue_id == q), default=0.0) < before
                    and all(c.state not in ("queued", "held", "quarantined")
                            for c in self.copies.values() if c.queue_id == q))

        gone = [q for q in self.messages if done(q)][:limit]
        for q in gone:
            del self.messages[q]
            self.finished.remove(q)
            self.copies = {i: c for i, c in self.copies.items() if c.queue_id != q}
            self.events = [e for e in self.events if e.queue_id != q]
        return len(gone)

    async def story(self, key: str) -> Story | None:
        if key not in self.messages:
            return None
        return Story(self.messages[key][0], tuple(c for c in self.copies.values() if c.queue_id == key),
                     tuple(e for e in self.events if e.queue_id == key))

    async def copies(self, states: Sequence[CopyState] | None, limit: int) -> list[Copy]:
        found = [c for c in self.copies.values() if states is None or c.state in states]
        return sorted(found, key=lambda c: (c.queue_id, c.id))[:limit]

    async def flush(self, now: float, *, queue_id: str | None = None, dest: str | None = None,
                    later_only: bool = False) -> int:
        due = [c for c in self.copies.values() if c.state == "queued" and queue_id in (None, c.queue_id)
               and dest in (None, c.target) and (not later_only or c.next_at > now)]
        for c in due:
            self.copies[c.id] = replace(c, next_at=now)
        for q in sorted({c.queue_id for c in due}):
            self.events.append(Event(now, q, None, "flushed", "", "due now"))
        return len(due)

    async def hold(self, queue_id: str, now: float) -> int:
        return self._operator(queue_id, now, ("queued",), "held", "held")

    async def release(self, queue_id: str, now: float) -> int:
        return self._operator(queue_id, now, ("held", "quarantined"), "queued", "released")

    async def delete(self, queue_id: str, now: float, *, refuse_in_flight: bool = False) -> int | InFlight:
        busy = tuple(sorted(i for i in self.marks if self.copies[i].queue_id == queue_id))
        if refuse_in_flight and busy:
            return InFlight(busy)
        return self._operator(queue_id, now, ("queued", "held", "quarantined"), "deleted", "deleted")

    def started(self, copy_ids: Sequence[int], now: float) -> None:
        self.marks.update((i, now) for i in copy_ids if self.copies[i].state == "queued")

    async def listing(self, query: QueueQuery) -> QueueListing:
        found = [c for c in self.copies.values() if (query.states is None or c.state in query.states)
                 and query.dest in (None, c.target)
                 and (query.received_before is None or c.received_at < query.received_before)]
        ids = sorted({c.queue_id for c in found}, key=lambda q: (self.messages[q][0].received_at, q),
                     reverse=query.newest_first)
        listed = tuple(ListedMessage(self.messages[q][0], tuple(
            ListedCopy(c, None, self.marks.get(c.id)) for c in sorted(found, key=lambda c: c.id) if c.queue_id == q))
            for q in ids[:query.limit])
        return QueueListing(listed, len(ids), len(found), sum(self.messages[q][0].size for q in ids))

    async def requeue(self, queue_id: str, now: float) -> int | BytesGone:
        chosen = [c for c in self.copies.values() if c.queue_id == queue_id
                  and c.state in ("quarantined", "bounced", "failed")]
        for c in chosen:
            self.copies[c.id] = replace(c, state="queued", target=c.origin, attempts=0, first_failure=None,
                                        detours=0, next_at=now)
            self.events.append(Event(now, queue_id, c.id, "requeued", c.origin, f"{c.state} at {c.target}"))
        return len(chosen)

    def _operator(self, queue_id: str, now: float, from_states: tuple[CopyState, ...], state: CopyState,
                  kind: str) -> int:
        chosen = [c for c in self.copies.values() if c.queue_id == queue_id and c.state in from_states]
        for c in chosen:
            self.copies[c.id] = replace(c, state=state, attempts=0, first_failure=None, next_at=now)
        if chosen:
            self.events.append(Event(now, queue_id, None, kind, "", f"{len(chosen)} copies"))  # type: ignore[arg-type]
        return len(chosen)

    async def claim(self, copies: Sequence[Copy], now: float) -> list[Copy]:
        """As one node (SQLite): every copy, except those `elsewhere` says another node holds."""
        self.claims.append([c.id for c in copies])
        return [c for c in copies if c.id not in self.elsewhere]

    async def listen(self, reload: Callable[[], None], flush: Callable[[], None]) -> None:
        return None

    async def run(self) -> None:
        await asyncio.Event().wait()

    def close(self) -> None:
        pass

    def kinds(self, queue_id: str) -> list[tuple[str, str]]:
        return [(e.kind, e.target) for e in self.events if e.queue_id == queue_id]


class ScriptedAgent:
    """Implements `delivery.base.Agent`: `script(recipient, attempt_number)` gives the outcome;
    copies to one domain share a job (as SMTP's do)."""

    def __init__(self, script: Callable[[str, int], Outcome]) -> None:
        self.script = script
        self.jobs: list[Job] = []
        self.tries: dict[str, int] = {}

    def batch_key(self, target: str) -> str:
        return target.rpartition("@")[2].lower()

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        self.jobs.append(job)
        result = {}
        for rcpt in job.recipients:
            self.tries[rcpt] = self.tries.get(rcpt, 0) + 1
            result[rcpt] = self.script(rcpt, self.tries[rcpt])
        return result

    async def close(self) -> None:
        pass
