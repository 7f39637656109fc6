"""One in-memory fake per interface: the store and a delivery agent that answers from a script."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Awaitable, Callable, Mapping, Sequence

from maildetour.core.outcome import Outcome
from maildetour.delivery.base import Job
from maildetour.store.records import Copy, CopyState, Event, Message, NewCopy, Story


class MemoryStore:
    """Implements `store.base.Store` in memory; `fail_accept` makes `accept` raise."""

    def __init__(self) -> None:
        self.messages: dict[str, tuple[Message, bytes]] = {}
        self.copies: dict[int, Copy] = {}
        self.events: list[Event] = []
        self.finished: list[str] = []
        self.keep_until: dict[str, float | None] = {}
        self.fail_accept: Exception | None = None
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

    def update(self, copy: Copy, events: Sequence[Event]) -> Awaitable[bool]:
        self.events += events
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(self.copies[copy.id].state not in ("held", "deleted"))
        if done.result():
            self.copies[copy.id] = copy
        return done

    async def unfinished(self) -> list[Copy]:
        return [c for c in self.copies.values() if c.state == "queued"]

    async def read(self, queue_id: str) -> bytes:
        return self.messages[queue_id][1]

    async def finish(self, queue_id: str, keep_until: float | None = None) -> None:
        self.finished.append(queue_id)
        self.keep_until[queue_id] = keep_until

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

    async def story(self, key: str) -> Story | None:
        if key not in self.messages:
            return None
        return Story(self.messages[key][0], tuple(c for c in self.copies.values() if c.queue_id == key),
                     tuple(e for e in self.events if e.queue_id == key))

    async def copies(self, states: Sequence[CopyState] | None, limit: int) -> list[Copy]:
        found = [c for c in self.copies.values() if states is None or c.state in states]
        return sorted(found, key=lambda c: (c.queue_id, c.id))[:limit]

    async def flush(self, now: float) -> int:
        due = [c for c in self.copies.values() if c.state == "queued"]
        for c in due:
            self.copies[c.id] = replace(c, next_at=now)
        return len(due)

    async def hold(self, queue_id: str, now: float) -> int:
        return self._operator(queue_id, now, ("queued",), "held", "held")

    async def release(self, queue_id: str, now: float) -> int:
        return self._operator(queue_id, now, ("held", "quarantined"), "queued", "released")

    async def delete(self, queue_id: str, now: float) -> int:
        return self._operator(queue_id, now, ("queued", "held", "quarantined"), "deleted", "deleted")

    def _operator(self, queue_id: str, now: float, from_states: tuple[CopyState, ...], state: CopyState,
                  kind: str) -> int:
        chosen = [c for c in self.copies.values() if c.queue_id == queue_id and c.state in from_states]
        for c in chosen:
            self.copies[c.id] = replace(c, state=state, attempts=0, first_failure=None, next_at=now)
        if chosen:
            self.events.append(Event(now, queue_id, None, kind, "", f"{len(chosen)} copies"))  # type: ignore[arg-type]
        return len(chosen)

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
