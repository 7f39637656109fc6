"""An SMTP intake worker's store: it reads the queue, and commits through the main process.

Internal. `RelayedStore` is a read-only `SqliteStore` (a worker's late-bounce matching reads
copies and kept bytes) whose `accept` has the main process's store commit the message: a small
one (`sqlite.in_database`) with its bytes, which travel along; a larger one's bytes it writes
to the spool itself first, fsync'ed on the worker's own core as `SqliteStore.accept` does, and
the main process commits the rows (`intake_channel.Channel.commit`; `finish`, which a late
bounce's own message needs, goes the same way). So the queue database has one writer: no
process waits for another's write lock, commits of all processes share one group commit, and
the main process schedules each copy the moment it commits it.

Contract: `accept` returns only after the main process committed (the 250 promise). Failure:
OSError from the spool write; `CommitRefused` (the spool file is removed: nothing was
promised) or `ChannelClosed` (the file stays: the commit may have happened, and the next
start's `SqliteStore.recover` removes the file only if it did not), both OSError: the handler
answers 451.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Sequence

from maildetour.intake_channel import Channel, ChannelClosed, CommitRefused
from maildetour.store.records import Copy, Event, Message, NewCopy
from maildetour.store.sqlite import SqliteStore, in_database


class RelayedStore(SqliteStore):
    def __init__(self, db_path: Path, spool_dir: Path, audit_path: Path, channel: Channel) -> None:
        super().__init__(db_path, spool_dir, audit_path, readonly=True)
        self._channel = channel

    async def accept(self, message: Message, data: bytes, copies: Sequence[NewCopy],
                     events: Sequence[Event]) -> list[Copy]:
        if self._channel.closed:  # the worker is stopping: write nothing
            raise ChannelClosed("the main process is gone")
        spooled = not in_database(len(data))  # else its bytes go in the main process's commit
        if spooled:
            await asyncio.to_thread(self.spool.write, message.queue_id, data)
        try:
            return await self._channel.commit(message, data, copies, events)
        except CommitRefused:
            if spooled:
                await asyncio.to_thread(self.spool.remove, message.queue_id)
            raise

    async def finish(self, queue_id: str, keep_until: float | None = None) -> None:
        await self._channel.finish(queue_id, keep_until)
