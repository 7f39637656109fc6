"""The store interface: messages, their copies and events, kept durably.

Internal. The embedded implementation is `store.sqlite` (SQLite + spool files); a PostgreSQL
store for several nodes can implement the same protocol. Nothing outside `store/` knows SQL.
Contract: when `accept` returns, the message bytes, its copies and its events are on disk
(fsync'ed); a crash after that loses nothing. Updates after acceptance may be lost in a crash
(the copy is simply tried again: at-least-once).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from maildetour.store.records import Copy, Event, NewCopy, NewMessage, Story


class Store(Protocol):
    async def accept(
        self, message: NewMessage, data: bytes, copies: Sequence[NewCopy], events: Sequence[Event]
    ) -> list[Copy]:
        """Durably keep a new message and its copies; return the copies with their ids."""
        ...

    async def update(self, copy: Copy, events: Sequence[Event]) -> None:
        """Write a copy's new state together with the events that explain it."""
        ...

    async def unfinished(self) -> list[Copy]:
        """Every queued copy (at start-up: what was in flight is due again)."""
        ...

    async def read(self, queue_id: str) -> bytes:
        ...

    async def finish(self, queue_id: str, keep_until: float | None = None) -> None:
        """All copies are final: the message bytes may go (quarantined ones are kept, and
        with `keep_until` they stay until then, for late bounces)."""
        ...

    async def find_copy(self, key: str, target: str) -> Copy | None:
        """The copy of message `key` (queue id or Message-ID) that went to `target`."""
        ...

    async def kept(self, queue_id: str, now: float) -> bool:
        """Are the message's bytes still here (not finished, or kept until after `now`)?"""
        ...

    async def purge(self, now: float) -> int:
        """Remove the bytes of finished messages whose keep_until has passed; return how many."""
        ...

    async def story(self, key: str) -> Story | None:
        """A message by queue id or Message-ID, with its copies and events."""
        ...

    async def run(self) -> None:
        """The writer: runs until cancelled (owned by the app's TaskGroup)."""
        ...

    def close(self) -> None:
        ...
