"""The store interface: messages, their copies and events, kept durably; the queue's owner.

Internal. The embedded implementation is `store.sqlite` (SQLite + spool files); `store.postgres`
keeps the queue of several nodes in PostgreSQL behind the same protocol, and the scheduler, the
inbound side and the operator's commands (`maildetour queue`, `trace`) use nothing else: no
module outside `store/` knows SQL.
Several nodes (`store.postgres`): a copy is attempted only by the node that holds its lease.
`accept` leases the new copies to the accepting node; every attempt `claim`s its copies first
(granted at once for copies this node holds already); an attempt's `update` releases the lease;
`unfinished` and `due` leave out copies another live node holds; `listen` hears the other
nodes. With one node (SQLite) these cost nothing: every claim is granted.
Contract: when `accept` returns, the message bytes, its copies and its events are on disk
(fsync'ed); a crash after that loses nothing. Updates after acceptance may be lost in a crash
(the copy is simply tried again: at-least-once). Every change of a copy's state is written
together with the events that explain it, and every committed event is appended to the audit
log. The operator's actions (hold, release, delete) win over an attempt in flight: `update`
does not overwrite a copy the operator held or deleted meanwhile; `delete` can instead refuse
while a copy is marked in an attempt (`started`), which the operator's `queue delete` asks for.
"""

from __future__ import annotations

import errno
from typing import Awaitable, Callable, Protocol, Sequence

from maildetour.store.listing import BytesGone, InFlight, QueueListing, QueueQuery
from maildetour.store.records import Copy, CopyState, DueCopies, Event, Message, NewCopy, Story
from maildetour.store.retention import RetentionReport

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13


def disk_full(error: BaseException) -> bool:
    """Whether a store's write failed because the disk (or the quota) is full: an OSError
    saying so, or SQLite's SQLITE_FULL. The client may send again later (452 4.3.1)."""
    if isinstance(error, OSError):
        return error.errno in _FULL_ERRNOS
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_FULL


class Store(Protocol):
    # --- the mail's way through --------------------------------------------------------------
    async def accept(self, message: Message, data: bytes, copies: Sequence[NewCopy],
                     events: Sequence[Event]) -> list[Copy]:
        """Durably keep a new message and its copies; return the copies with their ids. A copy
        born in another state than queued gets an event of that kind saying its `why`."""
        ...

    def update(self, copy: Copy, events: Sequence[Event]) -> Awaitable[bool]:
        """Write a copy's new state together with the events that explain it. Queued at once,
        so updates commit in the order they were asked for; await the result for the commit.
        False when the operator held or deleted the copy meanwhile, or (several nodes) another
        node took it over after this one's lease ran out (its state was kept; events are
        written: each attempt is recorded once). Releases this node's lease on the copy."""
        ...

    async def claim(self, copies: Sequence[Copy], now: float) -> list[Copy]:
        """Before an attempt: the copies this node may attempt now, leased to it. Left out (and
        to be forgotten by the caller): copies another live node holds, and copies no longer
        queued at the target and attempt count given (another node moved them on; the store
        has them as they are). One node: all of them, at once."""
        ...

    async def unfinished(self) -> list[Copy]:
        """Every queued copy (at start-up: what was in flight is due again)."""
        ...

    async def due(self, before: float, limit: int) -> DueCopies:
        """Queued copies due before `before`, soonest first (by due time, then id), at most
        `limit`, and how many queued copies come after them (one read: the scheduler holds
        only these in memory). Cheap however long the queue: an index on the due time."""
        ...

    async def oldest_queued(self) -> float | None:
        """When the oldest message with a queued copy was received (None: nothing queued). For
        the queue gauge; cheap (an index walk, not a scan)."""
        ...

    async def read(self, queue_id: str) -> bytes:
        ...

    async def finish(self, queue_id: str, keep_until: float | None = None) -> None:
        """All copies are final: the message bytes may go (quarantined ones are kept, and
        with `keep_until` they stay until then, for late bounces)."""
        ...

    async def finish_if_done(self, queue_id: str, keep_until: float | None = None) -> bool:
        """`finish` the message unless one of its copies is still queued, checked in the same
        transaction; True when it was finished. The scheduler asks this when the last copy of a
        message it holds in memory becomes final: its other copies may be in the store only."""
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

    # --- the operator's view and hands -------------------------------------------------------
    async def story(self, key: str) -> Story | None:
        """A message by queue id or Message-ID, with its copies and events (`trace`)."""
        ...

    async def copies(self, states: Sequence[CopyState] | None, limit: int) -> list[Copy]:
        """Copies in `states` (None: all), by queue id, at most `limit` (`queue`)."""
        ...

    async def flush(self, now: float, *, queue_id: str | None = None, dest: str | None = None,
                    later_only: bool = False) -> int:
        """Queued copies (of `queue_id`, going to `dest`: an address, imap:NAME or a domain; None:
        any) are due at `now`; return how many; event "flushed" on each message (`queue flush`).
        `later_only`: only copies due after `now` (the server's SIGUSR1, after the command
        already made every copy due, changes nothing and writes no second event)."""
        ...

    async def hold(self, queue_id: str, now: float) -> int:
        """Queued copies of `queue_id` are held (not tried until released); event "held"."""
        ...

    async def release(self, queue_id: str, now: float) -> int:
        """Held and quarantined copies of `queue_id` are queued again, due at once, with their
        attempts and failure clock reset (same target); event "released"."""
        ...

    async def delete(self, queue_id: str, now: float, *, refuse_in_flight: bool = False) -> int | InFlight:
        """Copies of `queue_id` that are not final are deleted (kept for `trace`, never tried
        again); the bytes go when nothing is left to deliver; event "deleted". With
        `refuse_in_flight` (a server runs), nothing is deleted while a copy of it is marked in
        an attempt: InFlight names them."""
        ...

    # --- the queue tools (issue 12) ----------------------------------------------------------
    def health(self) -> str | None:
        """None when the store can take writes now; else why not, in one line (cheap: for
        /readyz, and for the scheduler waiting out a full disk)."""
        ...

    def started(self, copy_ids: Sequence[int], now: float) -> None:
        """The scheduler starts an attempt with these copies: mark the queued ones in flight
        until the attempt's `update` clears it (written before that update, but not at once: an
        attempt that ends soon may cost no write of its own). Every mark is cleared when the
        server starts."""
        ...

    async def listing(self, query: QueueQuery) -> QueueListing:
        """The messages with copies that match `query`, with each copy's last reply and attempt
        mark, and totals of all that matched (`queue list`)."""
        ...

    async def requeue(self, queue_id: str, now: float) -> int | BytesGone:
        """Quarantined, bounced and failed copies of `queue_id` are queued again at their origin
        (the first target of their chain), due now, with attempts, failure clock and detours
        reset; event "requeued" per copy. BytesGone (nothing changed) when the message's bytes
        are no longer kept."""
        ...

    # --- retention (issue 12; `store.retention.Sweeper` calls these batch by batch) -------------
    async def expire_quarantined(self, before: float, now: float, limit: int) -> int:
        """At most `limit` copies quarantined before `before` are deleted (event "deleted": never
        delivered); a message left with nothing to deliver is finished at `now` and its bytes go
        (unless kept for late bounces). Return how many copies."""
        ...

    async def purge_finished(self, before: float, now: float, limit: int) -> int:
        """Remove at most `limit` messages, oldest first, with nothing left to deliver that
        finished before `before` (or, never marked finished, were received before it) and whose
        bytes are not kept for late bounces after `now`: rows, events and spool file. Return how many."""
        ...

    async def retention_report(self, now: float) -> RetentionReport:
        """What is kept beyond the queue: finished messages, bytes kept for late bounces, late
        bounces received, quarantined copies, with the oldest of each (`queue`)."""
        ...

    # --- running -------------------------------------------------------------------------------
    async def run(self) -> None:
        """The writer: runs until cancelled (owned by the app's TaskGroup)."""
        ...

    async def listen(self, reload: Callable[[], None], flush: Callable[[], None]) -> None:
        """Until cancelled: call `reload` when other nodes may have left copies for this one (a
        node died or stopped, the operator changed the queue elsewhere) and `flush` when the
        operator made every copy due. One node: returns at once (signals do this)."""
        ...

    def close(self) -> None:
        ...
