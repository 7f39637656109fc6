"""`maildetour queue ...`: list, show, flush, hold, release, delete and requeue, beside a running
server (postqueue and postsuper for maildetour).

Operator-facing. Every function prints its result and returns the exit code: 0 done; 1 nothing
matched or refused (one line on stderr, `maildetour: ...`). The queue is read and changed only
through the store (`store.base.Store`); each change is written with its event (`flushed`,
`held`, `released`, `deleted`, `requeued`), which `trace` and `audit.jsonl` show. A running
server (its pid file) is then told by signal: SIGUSR1 for a flush of the whole queue (read it
again, every queued copy due now), SIGUSR2 for everything else (read it again: new, dropped
and earlier-due copies). With no server running, changes wait for the next start.

In flight: the scheduler marks each attempt's copies in the store when it starts; `delete`
refuses a message with a marked copy while a server runs (a mark left by a server that is gone
means nothing and is cleared at the next start). Shares `commands`' store opener and pid lookup.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import replace
from typing import Awaitable

from maildetour import report
from maildetour.command_base import fail, server_pid, with_store
from maildetour.config.model import Config
from maildetour.store.base import Store
from maildetour.store.listing import BytesGone, InFlight, QueueListing, QueueQuery
from maildetour.store.records import CopyState, Story
from maildetour.store.retention import RetentionReport


def _tell(pid: int | None, sig: signal.Signals) -> None:
    if pid is not None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # it stopped meanwhile: the next start reads the queue anyway
            pass


def _after_change(config: Config, done: str) -> int:
    """Print what was done and tell a running server to read the queue again."""
    pid = server_pid(config)
    _tell(pid, signal.SIGUSR2)
    print(f"{done}; " + (f"the server (pid {pid}) reads the queue again" if pid is not None
                         else "no server running: it takes effect at the next start"))
    return 0


def _copies(n: int) -> str:
    return f"{n} cop{'y' if n == 1 else 'ies'}"


# --- looking --------------------------------------------------------------------------------
def list_queue(config: Config, *, states: tuple[CopyState, ...] | None, dest: str | None,
               older_than: float | None, limit: int, newest_first: bool, as_json: bool) -> int:
    """`queue list`: text like `postqueue -p`, or JSON lines like `postqueue -j`. Exit 1 when
    filters (state, destination, age) were given and nothing matched."""
    now = time.time()
    query = QueueQuery(states=states, dest=dest, received_before=None if older_than is None else now - older_than,
                       limit=limit, newest_first=newest_first)
    async def work(store: Store) -> tuple[QueueListing, RetentionReport]:
        return await store.listing(query), await store.retention_report(now)

    found = with_store(config, work, readonly=True)
    listing, kept = found if found is not None else (None, None)
    if listing is None or not listing.matched_messages:
        filtered = dest is not None or older_than is not None or states not in (None, QueueQuery().states)
        if filtered:
            return fail("no copies match")
        if not as_json:
            print("queue is empty")
            if kept is not None:
                print(report.kept(kept, now, config.store))
        return 0
    listing = _without_stale_marks(listing, server_pid(config) is not None)
    if as_json:
        for line in report.queue_json(listing, now):
            print(line)
        if listing.truncated:  # stdout stays JSON lines
            print(f"maildetour: {report.truncation(listing)}", file=sys.stderr)
    else:
        print(report.queue_listing(listing, now))
        assert kept is not None
        print(report.kept(kept, now, config.store))
    return 0


def _without_stale_marks(listing: QueueListing, server_running: bool) -> QueueListing:
    """With no server running, a mark is left from one that stopped: nothing is in flight."""
    if server_running:
        return listing
    return replace(listing, messages=tuple(
        replace(m, copies=tuple(replace(c, in_flight_since=None) for c in m.copies)) for m in listing.messages))


def show(config: Config, key: str, body: bool) -> int:
    """`queue show ID`: the envelope, every copy and the header block; `--body`: the whole
    message as it is stored (as text)."""
    async def work(store: Store) -> tuple[Story, bytes | None] | None:
        story = await store.story(key)
        if story is None:
            return None
        try:
            return story, await store.read(story.message.queue_id)
        except FileNotFoundError:
            return story, None

    found = with_store(config, work, readonly=True)
    if found is None:
        return fail(f"no message with queue id or Message-ID {key!r}")
    print(report.message_show(found[0], found[1], body=body, now=time.time()))
    return 0


# --- changing --------------------------------------------------------------------------------
def flush(config: Config, queue_id: str | None = None, dest: str | None = None) -> int:
    """`queue flush`: every queued copy due now (like `postqueue -f`; done even when nothing is
    queued); `flush ID` / `flush --dest ADDR`: only those (exit 1 when none is queued)."""
    chosen = queue_id is not None or dest is not None
    count = with_store(config, lambda store: store.flush(time.time(), queue_id=queue_id, dest=dest),
                        readonly=False)
    which = " ".join(([f"of {queue_id}"] if queue_id else []) + ([f"to {dest}"] if dest else []))
    if chosen and not count:
        return fail(f"no queued copies {which}")
    if chosen:
        return _after_change(config, f"flushed {_copies(count or 0)} {which}: due now")
    pid = server_pid(config)
    if pid is not None:
        _tell(pid, signal.SIGUSR1)
        print(f"asked the server (pid {pid}) to retry every queued copy now ({_copies(count or 0)})")
    elif not count:
        print("queue is empty: nothing to flush")
    else:
        print(f"no server running; {count} queued copies are due at the next start")
    return 0


def hold(config: Config, queue_id: str) -> int:
    """`queue hold ID` (postsuper -h): its queued copies wait until released."""
    count = with_store(config, lambda store: store.hold(queue_id, time.time()), readonly=False)
    if not count:
        return fail(f"no queued copies of {queue_id}")
    return _after_change(config, f"held {_copies(count)} of {queue_id}")


def release(config: Config, queue_id: str) -> int:
    """`queue release ID` (postsuper -H): held and quarantined copies are queued again where
    they stopped, due now, attempts and failure clock reset."""
    count = with_store(config, lambda store: store.release(queue_id, time.time()), readonly=False)
    if not count:
        return fail(f"no held or quarantined copies of {queue_id}")
    return _after_change(config, f"released {_copies(count)} of {queue_id}")


def delete(config: Config, queue_id: str) -> int:
    """`queue delete ID` (postsuper -d): its copies that are not final are never tried again;
    refused while a copy of it is in an attempt (a running server marked it)."""
    running = server_pid(config) is not None

    def work(store: Store) -> Awaitable[int | InFlight]:
        return store.delete(queue_id, time.time(), refuse_in_flight=running)

    result = with_store(config, work, readonly=False)
    if isinstance(result, InFlight):
        busy = ", ".join(f"#{c}" for c in result.copies)
        return fail(f"{queue_id} not deleted: {_copies(len(result.copies))} ({busy}) in a delivery attempt "
                     "now; try again when it has reported")
    if not result:
        return fail(f"no undelivered copies of {queue_id}")
    return _after_change(config, f"deleted {_copies(result)} of {queue_id}")


def requeue(config: Config, queue_id: str) -> int:
    """`queue requeue ID` (like postsuper -r): its quarantined, bounced and failed copies start
    over at their first target, due now, with a fresh attempt count."""
    result = with_store(config, lambda store: store.requeue(queue_id, time.time()), readonly=False)
    if isinstance(result, BytesGone):
        return fail(f"{queue_id} not requeued: its bytes are no longer kept (its copies were final)")
    if not result:
        return fail(f"no quarantined, bounced or failed copies of {queue_id}")
    return _after_change(config, f"requeued {_copies(result)} of {queue_id} at their first target")
