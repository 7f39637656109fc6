"""Local delivery into our own Maildir mailboxes.

Internal. Each recipient gets the message with a Return-Path header (the envelope sender) in
front. Writes go through WRITERS threads of the agent's own in batches (a group commit, as the
store's writer does): while every writer is busy, the copies that arrive wait and form the
next batch (at most BATCH_MESSAGES messages or BATCH_BYTES), and `mailbox.maildir.deliver_many`
fsyncs each file and then each `new/` directory once per batch before this reports Delivered.
Under load that is one directory fsync and one thread hand-off for many copies instead of one
each; a copy that arrives while a writer is free is written at once (two writers: a detour
copy need not wait for the fsyncs of the message's mailbox copy a moment before). A write error (disk full,
permissions) is a TemporaryFailure: the copy is retried.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping

from maildetour.core.outcome import Delivered, Outcome, TemporaryFailure
from maildetour.delivery.base import Job
from maildetour.mailbox import maildir

BATCH_MESSAGES = 64
BATCH_BYTES = 8 << 20
WRITERS = 2

_Waiting = tuple[Path, bytes, "asyncio.Future[str]"]


class LocalAgent:
    def __init__(self, mailbox_dir: Callable[[str], Path]) -> None:
        self._mailbox_dir = mailbox_dir
        self._threads = ThreadPoolExecutor(WRITERS, thread_name_prefix="maildir-writer")
        self._waiting: deque[_Waiting] = deque()
        self._writing = 0  # batches in the threads

    def batch_key(self, target: str) -> str:
        """Every mailbox copy of a message goes in one job."""
        return ""

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        data = b"Return-Path: <" + job.mail_from.encode("utf-8", "replace") + b">\r\n" + job.data
        written = [self._write(self._mailbox_dir(recipient), data) for recipient in job.recipients]
        outcomes: dict[str, Outcome] = {}
        for recipient, name in zip(job.recipients, written):
            try:
                outcomes[recipient] = Delivered(f"250 2.0.0 delivered to mailbox as {await name}", relay="local")
            except OSError as exc:
                outcomes[recipient] = TemporaryFailure(f"451 4.3.0 mailbox write failed: {exc.strerror}",
                                                       451, "4.3.0", "the mailbox could not be written", relay="local")
        return outcomes

    async def close(self) -> None:
        self._threads.shutdown(wait=False)  # batches being written finish

    def _write(self, root: Path, data: bytes) -> asyncio.Future[str]:
        name: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.append((root, data, name))
        if self._writing < WRITERS:
            self._next_batch()
        return name

    def _next_batch(self) -> None:
        batch: list[_Waiting] = []
        size = 0
        while self._waiting and len(batch) < BATCH_MESSAGES and (not batch or size < BATCH_BYTES):
            batch.append(self._waiting.popleft())
            size += len(batch[-1][1])
        if not batch:
            return
        try:
            done = asyncio.get_running_loop().run_in_executor(
                self._threads, maildir.deliver_many, [(root, data) for root, data, _ in batch])
        except RuntimeError:  # closed (a reload retired this agent): the copies are tried again
            for _, _, name in batch:
                if not name.done():
                    name.set_exception(OSError("the mailbox writer is closed"))
            self._next_batch()  # the rest fail the same way
            return
        self._writing += 1
        done.add_done_callback(lambda finished: self._settle(batch, finished))

    def _settle(self, batch: list[_Waiting], finished: asyncio.Future[list[str | OSError]]) -> None:
        self._writing -= 1
        try:
            results: list[str | OSError] = finished.result()
        except BaseException as exc:  # cannot happen (deliver_many returns its errors); fail the batch
            results = [exc if isinstance(exc, OSError) else OSError(str(exc)) for _ in batch]
        for (_, _, name), result in zip(batch, results):
            if name.done():  # its attempt was cancelled meanwhile
                continue
            if isinstance(result, OSError):
                name.set_exception(result)
            else:
                name.set_result(result)
        self._next_batch()
