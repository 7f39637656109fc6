"""One in-memory fake per interface: the store and a delivery agent that answers from a script."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Callable, Mapping, Sequence

from maildetour.core.outcome import Outcome
from maildetour.delivery.base import Job
from maildetour.store.records import Copy, Event, MessageInfo, NewCopy, NewMessage, Story


class MemoryStore:
    """Implements `store.base.Store` in memory; `fail_accept` makes `accept` raise."""

    def __init__(self) -> None:
        self.messages: dict[str, tuple[NewMessage, bytes]] = {}
        self.copies: dict[int, Copy] = {}
        self.events: list[Event] = []
        self.finished: list[str] = []
        self.keep_until: dict[str, float | None] = {}
        self.fail_accept: Exception | None = None
        self._next = 1

    async def accept(self, message: NewMessage, data: bytes, copies: Sequence[NewCopy],
                     events: Sequence[Event]) -> list[Copy]:
        if self.fail_accept is not None:
            raise self.fail_accept
        self.messages[message.queue_id] = (message, data)
        made = []
        for c in copies:
            copy = Copy(self._next, message.queue_id, message.mail_from, c.recipient, c.target,
                        c.hidden_origin, c.state, 0, message.received_at, None, 0, message.received_at)
            self._next += 1
            self.copies[copy.id] = copy
            made.append(copy)
        self.events += [replace(e, copy_id=made[-e.copy_id - 1].id) if e.copy_id is not None and e.copy_id < 0
                        else e for e in events]
        return made

    async def update(self, copy: Copy, events: Sequence[Event]) -> None:
        self.copies[copy.id] = copy
        self.events += events

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
        m, _ = self.messages[key]
        info = MessageInfo(m.queue_id, m.mail_from, m.received_at, m.message_id, m.size, m.client)
        return Story(info, tuple(c for c in self.copies.values() if c.queue_id == key),
                     tuple(e for e in self.events if e.queue_id == key))

    async def run(self) -> None:
        await asyncio.Event().wait()

    def close(self) -> None:
        pass

    def kinds(self, queue_id: str) -> list[tuple[str, str]]:
        return [(e.kind, e.target) for e in self.events if e.queue_id == queue_id]


class ScriptedAgent:
    """Implements `delivery.base.Agent`: `script(recipient, attempt_number)` gives the outcome."""

    def __init__(self, script: Callable[[str, int], Outcome]) -> None:
        self.script = script
        self.jobs: list[Job] = []
        self.tries: dict[str, int] = {}

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        self.jobs.append(job)
        result = {}
        for rcpt in job.recipients:
            self.tries[rcpt] = self.tries.get(rcpt, 0) + 1
            result[rcpt] = self.script(rcpt, self.tries[rcpt])
        return result

    async def close(self) -> None:
        pass
