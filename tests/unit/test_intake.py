"""SMTP intake workers (issue 13, "use every core"): the channel between a worker and the main
process. A worker writes the bytes to the spool, the main process commits the rows (the queue's
one writer), schedules the copies at once and answers; the worker's 250 waits for that answer.
Real SQLite stores on one database and spool, the two ends on a real socket pair."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from maildetour.core import replies
from maildetour.core.outcome import Delivered, PermanentFailure
from maildetour.inbound.handler import storage_reply
from maildetour.intake_channel import (
    INLINE,
    MAX_LINE,
    Channel,
    ChannelClosed,
    CommitRefused,
    RelayedMetrics,
    count,
    decode,
    decode_answer,
    decode_copy,
    decode_outcome,
    encode_copy,
    encode_outcome,
)
from maildetour.intake_store import RelayedStore
from maildetour.intake_workers import IntakeWorkers, _Worker
from maildetour.metrics import Metrics
from maildetour.store.records import Copy, Event, Message, NewCopy
from maildetour.store.sqlite import IN_DATABASE, SqliteStore
from tests.configs import seed_config

COPY = Copy(7, "Q1", "a@b.example", "r@x.example", "t@x.example", "t@x.example", False, "queued", 0, 5.0,
            None, 0, 4.0, 120)


def test_copies_and_outcomes_cross_the_channel_unchanged() -> None:
    line = json.dumps(["accepted", 1, [encode_copy(COPY)]]).encode()
    message = decode_answer(line)
    assert [decode_copy(c) for c in message[2]] == [COPY]
    for outcome in (Delivered("250 ok"), PermanentFailure("550 no", 550, "5.1.1")):
        assert decode_outcome(json.loads(json.dumps(encode_outcome(outcome)))) == outcome


@pytest.mark.parametrize("line", [b"not json", b"[]", b'{"copies": []}', b'["copies", []]', b'["delete", 7]',
                                  b'["count", "os.system", []]', b'["report", [], "x"]',
                                  b'["accept", "1", [], [], [], null]', b'["accept", 1, [], [], []]',
                                  b'["accepted", 1, []]'])
def test_anything_else_from_a_worker_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode(line)


@pytest.mark.parametrize("line", [b'["accept", 1, [], [], [], null]', b'["accepted", "1", []]', b'["refused", 1, "x"]',
                                  b'["refused", 1]', b'["ready", 1]'])
def test_anything_else_from_the_main_process_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode_answer(line)


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

    relayed = RelayedMetrics(Channel(Writer()))  # type: ignore[arg-type]
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


class SubmittingScheduler:
    def __init__(self) -> None:
        self.submitted: list[Copy] = []

    def submit(self, copies: list[Copy]) -> None:
        self.submitted += copies


def new_message(queue_id: str) -> tuple[Message, list[NewCopy], list[Event]]:
    return (Message(queue_id, "a@b.example", 5.0, "", 3, "c"),
            [NewCopy("ituki@example.com", "t@pc.example.net", False),
             NewCopy("ituki@example.com", "ituki-ex@gmail.com", True)],
            [Event(5.0, queue_id, None, "accepted", "ituki@example.com", "")])


class Pair:
    """A worker's `RelayedStore` and the main process's `SqliteStore` + `IntakeWorkers` on one
    database and spool, talking over a real socket pair as the two processes do."""

    def __init__(self, tmp_path: Path) -> None:
        self.paths = (tmp_path / "queue.sqlite3", tmp_path / "spool", tmp_path / "audit.jsonl")
        self.config = seed_config(tmp_path)
        self.scheduler = SubmittingScheduler()

    async def __aenter__(self) -> Pair:
        self.ours = SqliteStore(*self.paths, cache_bytes=8 << 20, cache_seconds=60)
        self.ours.recover()
        self.writing = asyncio.create_task(self.ours.run())
        main_sock, worker_sock = socket.socketpair()
        self.main_reader, self.main_writer = await asyncio.open_unix_connection(sock=main_sock, limit=MAX_LINE)
        worker_reader, worker_writer = await asyncio.open_unix_connection(sock=worker_sock, limit=MAX_LINE)
        self.channel = Channel(worker_writer)
        self.listening = asyncio.create_task(self.channel.listen(worker_reader))
        self.worker = RelayedStore(*self.paths, self.channel)
        self.intake = IntakeWorkers(self.config, scheduler=self.scheduler, store=self.ours,  # type: ignore[arg-type]
                                    metrics=Metrics(), spawn=asyncio.ensure_future)
        self.end = _Worker(1, None, self.main_reader, self.main_writer, 0.0)  # type: ignore[arg-type]
        return self

    async def hear_one(self) -> list[Any]:
        """The main process reads the worker's next line and acts on it."""
        said = decode(await self.main_reader.readline())
        self.intake._hear(self.end, said)
        return said

    async def __aexit__(self, *exc: object) -> None:
        self.main_writer.close()
        await asyncio.gather(self.listening, return_exceptions=True)
        self.writing.cancel()
        await asyncio.gather(self.writing, return_exceptions=True)
        self.worker.close()
        self.ours.close()


def test_a_workers_message_is_committed_by_the_main_process_and_scheduled_before_the_answer(
        tmp_path: Path) -> None:
    """The rows come from the main process's store, whose scheduler has the copies by the time
    the worker hears "accepted" (then it sends its 250). A message up to INLINE bytes travels
    along and is delivered from memory (one up to IN_DATABASE is committed with its bytes: no
    spool file); the worker writes a larger one's spool file, and it is read from there."""
    small, large = b"Subject: small\r\n\r\nhi\r\n", b"x" * (INLINE + 1)

    async def main() -> tuple[list[str], list[list[str]], list[str], bytes, bytes, list[tuple[str, int]]]:
        async with Pair(tmp_path) as pair:
            said: list[list[Any]] = []
            seen_at_answer: list[list[str]] = []
            made: list[Copy] = []
            for queue_id, data in (("SMALL", small), ("LARGE", large)):
                accepting = asyncio.ensure_future(pair.worker.accept(*_args(queue_id, data)))
                said.append(await pair.hear_one())
                made += await accepting
                seen_at_answer.append([c.queue_id for c in pair.scheduler.submitted])
            files = sorted(p.name for p in (tmp_path / "spool").iterdir() if p.is_file())
            for path in (tmp_path / "spool").iterdir():
                if path.is_file():
                    path.unlink()  # what is read now can only come from memory
            got_small = await pair.ours.read("SMALL")
            try:
                got_large = await pair.ours.read("LARGE")
            except FileNotFoundError:
                got_large = b"<read from the spool, which is gone>"
            rows = sqlite3.connect(pair.paths[0]).execute(
                "SELECT queue_id, count(*) FROM copies GROUP BY queue_id ORDER BY queue_id").fetchall()
            assert [c.id for c in made] == [c.id for c in pair.scheduler.submitted]
            return [m[0] for m in said], seen_at_answer, files, got_small, got_large, rows

    kinds, seen_at_answer, files, got_small, got_large, rows = asyncio.run(main())
    assert kinds == ["accept", "accept"]
    assert seen_at_answer == [["SMALL", "SMALL"], ["SMALL", "SMALL", "LARGE", "LARGE"]]
    assert files == ["LARGE"]  # written by the worker; SMALL's bytes are committed with its rows
    assert rows == [("LARGE", 2), ("SMALL", 2)]  # committed by the main process
    assert got_small == small
    assert got_large == b"<read from the spool, which is gone>"


def _args(queue_id: str, data: bytes) -> tuple[Message, bytes, list[NewCopy], list[Event]]:
    message, copies, events = new_message(queue_id)
    return message, data, copies, events


@pytest.mark.parametrize("size", [3, IN_DATABASE + 1])
def test_a_commit_the_main_process_refuses_is_an_error_and_leaves_no_file(tmp_path: Path, size: int) -> None:
    async def main() -> tuple[CommitRefused, list[str], list[Copy]]:
        async with Pair(tmp_path) as pair:
            async def full_disk(*args: Any) -> list[Copy]:
                raise OSError(28, "No space left on device")

            pair.ours.enter = full_disk  # type: ignore[method-assign]
            accepting = asyncio.ensure_future(pair.worker.accept(*_args("Q1", b"x" * size)))
            await pair.hear_one()
            with pytest.raises(CommitRefused) as refused:
                await accepting
            files = [p.name for p in (tmp_path / "spool").iterdir() if p.is_file()]
            return refused.value, files, pair.scheduler.submitted

    refused, files, submitted = asyncio.run(main())
    assert "No space left on device" in str(refused)
    assert storage_reply(refused) == replies.NO_STORAGE  # the worker's client hears 452 4.3.1
    assert files == [] and submitted == []


def test_a_main_process_gone_before_its_answer_leaves_the_file_for_the_next_start(tmp_path: Path) -> None:
    """Whether it committed is unknown: the spool file of a large message stays (`recover` at
    the next start keeps it only if its rows exist) and the session gets an error (451), not a
    250."""
    async def main() -> tuple[bool, list[str]]:
        async with Pair(tmp_path) as pair:
            accepting = asyncio.ensure_future(pair.worker.accept(*_args("Q1", b"x" * (IN_DATABASE + 1))))
            decode(await pair.main_reader.readline())  # read, never answered
            pair.main_writer.close()
            with pytest.raises(ChannelClosed):
                await accepting
            with pytest.raises(ChannelClosed):  # and later ones fail at once, writing nothing
                await pair.worker.accept(*_args("Q2", b"y\r\n"))
            return isinstance(ChannelClosed(), OSError), sorted(
                p.name for p in (tmp_path / "spool").iterdir() if p.is_file())

    is_os_error, files = asyncio.run(main())
    assert is_os_error  # the handler answers 451 for an OSError
    assert files == ["Q1"]


def test_a_late_bounces_own_message_is_finished_by_the_main_process_too(tmp_path: Path) -> None:
    """`LateBounces` in a worker accepts the report and then finishes it (kept a while, never
    delivered): both writes are the main process's, the worker's database is read-only."""
    async def main() -> tuple[list[Any], list[Copy], tuple[int, float]]:
        async with Pair(tmp_path) as pair:
            message = Message("DSN1", "", 5.0, "", 3, "c")
            event = Event(5.0, "DSN1", None, "accepted", "", "DSN to our SRS address")
            accepting = asyncio.ensure_future(pair.worker.accept(message, b"report\r\n", [], [event]))
            said = [await pair.hear_one()]
            made = await accepting
            finishing = asyncio.ensure_future(pair.worker.finish("DSN1", 99.0))
            said.append(await pair.hear_one())
            await finishing
            row = sqlite3.connect(pair.paths[0]).execute(
                "SELECT finished, keep_until FROM messages WHERE queue_id='DSN1'").fetchone()
            with pytest.raises(sqlite3.OperationalError, match="readonly"):  # its own connection cannot write
                await pair.worker.purge(100.0)
            return [m[0] for m in said], made, row

    kinds, made, row = asyncio.run(main())
    assert kinds == ["accept", "finish"]
    assert made == []
    assert row == (1, 99.0)
