"""SMTP intake workers (issue 13, "use every core"): the channel a worker speaks to the main
process, and the main process's sweep that schedules copies a worker committed but could not
announce (killed between its commit and its notice). Real SQLite stores, two on one database
as the main process and a worker have."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Awaitable

import pytest

from maildetour.core.outcome import Delivered, PermanentFailure
from maildetour.intake_channel import (
    INLINE,
    Notifier,
    RelayedMetrics,
    count,
    decode,
    decode_copy,
    decode_outcome,
    encode_copy,
    encode_outcome,
)
from maildetour.intake_workers import IntakeWorkers
from maildetour.metrics import Metrics
from maildetour.store.records import Copy, Event, Message, NewCopy
from maildetour.store.sqlite import SqliteStore
from tests.configs import seed_config

COPY = Copy(7, "Q1", "a@b.example", "r@x.example", "t@x.example", "t@x.example", False, "queued", 0, 5.0,
            None, 0, 4.0, 120)


def test_copies_and_outcomes_cross_the_channel_unchanged() -> None:
    line = json.dumps(["copies", [encode_copy(COPY)]]).encode()
    message = decode(line)
    assert [decode_copy(c) for c in message[1]] == [COPY]
    for outcome in (Delivered("250 ok"), PermanentFailure("550 no", 550, "5.1.1")):
        assert decode_outcome(json.loads(json.dumps(encode_outcome(outcome)))) == outcome


@pytest.mark.parametrize("line", [b"not json", b"[]", b'{"copies": []}', b'["copies"]', b'["delete", 7]',
                                  b'["count", "os.system", []]', b'["report", [], "x"]'])
def test_anything_else_from_a_worker_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode(line)


@pytest.mark.parametrize("value", [[1, 2], ["7", "Q1", *encode_copy(COPY)[2:]], "copy"])
def test_a_copy_of_the_wrong_shape_is_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        decode_copy(value)


def test_a_workers_counts_are_made_again_by_the_main_process() -> None:
    sent: list[bytes] = []

    class Writer:
        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes) -> None:
            sent.append(data)

    relayed = RelayedMetrics(Notifier(Writer()))  # type: ignore[arg-type]
    relayed.accepted(3)
    relayed.refused("550 5.1.1")
    main = Metrics()
    for line in sent:
        kind, name, args = decode(line)
        assert kind == "count"
        count(main, name, args)
    assert main.registry.get_sample_value("maildetour_smtp_accepted_messages_total") == 1
    assert main.registry.get_sample_value("maildetour_smtp_accepted_recipients_total") == 3
    with pytest.raises(ValueError):
        count(main, "accepted", ["three"])


class AdoptingScheduler:
    """Records what the sweep hands over; knows the copies `known` names (announced ones)."""

    def __init__(self) -> None:
        self.known: set[int] = set()
        self.adopted: list[Copy] = []

    async def adopt(self, found: Awaitable[list[Copy]]) -> int:
        fresh = [c for c in await found if c.id not in self.known]
        self.adopted += fresh
        self.known.update(c.id for c in fresh)
        return len(fresh)


async def commit(store: SqliteStore, queue_id: str, targets: int = 1) -> list[Copy]:
    copies = [NewCopy("ituki@example.com", f"t{i}@pc.example.net", False) for i in range(targets)]
    return await store.accept(Message(queue_id, "a@b.example", 5.0, "", 3, "c"), b"x\r\n", copies,
                              [Event(5.0, queue_id, None, "accepted", "ituki@example.com", "")])


def test_the_sweep_schedules_exactly_the_copies_nobody_announced(tmp_path: Path) -> None:
    config = seed_config(tmp_path)
    paths = (tmp_path / "queue.sqlite3", tmp_path / "spool", tmp_path / "audit.jsonl")

    async def main() -> tuple[list[str], list[int], int]:
        ours = SqliteStore(*paths)
        ours.recover()
        worker = SqliteStore(*paths, upgrade=False)  # an intake worker's own store on the same files
        tasks = [asyncio.create_task(ours.run()), asyncio.create_task(worker.run())]
        try:
            await commit(ours, "BEFORE")  # the scheduler loads these at start: not the sweep's
            scheduler = AdoptingScheduler()
            intake = IntakeWorkers(config, scheduler=scheduler, store=ours, metrics=Metrics(),  # type: ignore[arg-type]
                                   spawn=asyncio.ensure_future)
            await intake.mark_known()
            announced = await commit(worker, "ANNOUNCED", 2)
            scheduler.known.update(c.id for c in announced)  # its notice came
            lost = await commit(worker, "LOST", 2)  # its worker died before the notice
            first = await intake.sweep_once()  # commits since the last look wait one more sweep
            later = await commit(worker, "LATER")
            second = await intake.sweep_once()
            third = await intake.sweep_once()
            fourth = await intake.sweep_once()
            return ([c.queue_id for c in scheduler.adopted], [first, second, third, fourth],
                    sum(1 for c in scheduler.adopted if c in lost or c in later))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            worker.close()
            ours.close()

    adopted, found, matching = asyncio.run(main())
    assert adopted == ["LOST", "LOST", "LATER"]
    assert found == [0, 2, 1, 0]
    assert matching == 3


class SubmittingScheduler:
    def __init__(self) -> None:
        self.submitted: list[Copy] = []

    def submit(self, copies: list[Copy]) -> None:
        self.submitted += copies


def test_a_small_message_travels_with_its_notice_and_is_not_read_from_the_spool(tmp_path: Path) -> None:
    """The worker's notice carries the bytes it just committed (up to INLINE); the main process
    keeps them for the delivery, which then reads nothing from the spool. A larger message
    travels without them (null) and is read from the spool as before."""
    config = seed_config(tmp_path)
    paths = (tmp_path / "queue.sqlite3", tmp_path / "spool", tmp_path / "audit.jsonl")
    small, large = b"Subject: small\r\n\r\nhi\r\n", b"x" * (INLINE + 1)

    async def main() -> tuple[list[list[Any]], bytes, bytes, list[str]]:
        ours = SqliteStore(*paths, cache_bytes=8 << 20, cache_seconds=60)
        ours.recover()
        worker = SqliteStore(*paths, upgrade=False, cache_bytes=4 * INLINE, cache_seconds=60)
        tasks = [asyncio.create_task(ours.run()), asyncio.create_task(worker.run())]
        sent: list[bytes] = []

        class Writer:
            def is_closing(self) -> bool:
                return False

            def write(self, data: bytes) -> None:
                sent.append(data)

        try:
            notifier = Notifier(Writer(), bytes_of=worker.take_cached)  # type: ignore[arg-type]
            for queue_id, data in (("SMALL", small), ("LARGE", large)):
                copies = await worker.accept(Message(queue_id, "a@b.example", 5.0, "", 3, "c"), data,
                                             [NewCopy("ituki@example.com", "t@pc.example.net", False)],
                                             [Event(5.0, queue_id, None, "accepted", "ituki@example.com", "")])
                notifier.accepted(copies)
            scheduler = SubmittingScheduler()
            intake = IntakeWorkers(config, scheduler=scheduler, store=ours, metrics=Metrics(),  # type: ignore[arg-type]
                                   spawn=asyncio.ensure_future)
            messages = [decode(line) for line in sent]
            for message in messages:
                intake._hear(None, message)  # type: ignore[arg-type]
            for path in (tmp_path / "spool").iterdir():
                if path.is_file():
                    path.unlink()  # what is read now can only come from memory
            got_small = await ours.read("SMALL")
            try:
                got_large = await ours.read("LARGE")
            except FileNotFoundError:
                got_large = b"<read from the spool, which is gone>"
            return messages, got_small, got_large, [c.queue_id for c in scheduler.submitted]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            worker.close()
            ours.close()

    messages, got_small, got_large, submitted = asyncio.run(main())
    assert [m[0] for m in messages] == ["copies", "copies"]
    assert messages[0][2] is not None and messages[1][2] is None  # the large one travels without
    assert got_small == small
    assert got_large == b"<read from the spool, which is gone>"
    assert submitted == ["SMALL", "LARGE"]
