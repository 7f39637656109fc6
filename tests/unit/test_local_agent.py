"""Local delivery (`delivery.local.LocalAgent`): copies that arrive while a batch is being
written go together in the next one (one thread hand-off and one `new/` fsync for the group);
each copy still gets its own outcome, and a copy alone is written at once."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from maildetour.core.outcome import Delivered, TemporaryFailure
from maildetour.delivery import local
from maildetour.delivery.base import Job
from maildetour.delivery.local import LocalAgent
from maildetour.mailbox.maildir import list_messages


def job(n: int, recipient: str) -> Job:
    return Job(queue_id=f"Q{n}", mail_from="a@b.example", recipients=(recipient,),
               data=f"Subject: {n}\r\n\r\nbody {n}\r\n".encode(), received_at=5.0)


def test_copies_arriving_together_are_written_in_few_batches_and_each_is_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    real = local.maildir.deliver_many

    def counting(messages: list[tuple[Path, bytes]]) -> list[str | OSError]:
        batches.append(len(messages))
        return real(messages)

    monkeypatch.setattr(local.maildir, "deliver_many", counting)

    async def main() -> list[object]:
        agent = LocalAgent(lambda address: tmp_path / address)
        try:
            results = await asyncio.gather(*(agent.deliver(job(n, f"box{n % 3}@x.example")) for n in range(30)))
            alone = await agent.deliver(job(99, "box0@x.example"))
        finally:
            await agent.close()
        return [*(next(iter(r.values())) for r in results), next(iter(alone.values()))]

    outcomes = asyncio.run(main())
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert sum(batches) == 31 and len(batches) < 31  # grouped, none lost
    assert batches[-1] == 1  # the copy that came alone went at once, alone
    assert sum(len(list_messages(tmp_path / f"box{i}@x.example")) for i in range(3)) == 31
    bodies = {m.name: (tmp_path / "box0@x.example" / "new" / m.name).read_bytes()
              for m in list_messages(tmp_path / "box0@x.example")}
    assert any(b.endswith(b"body 99\r\n") and b.startswith(b"Return-Path: <a@b.example>\r\n") for b in bodies.values())


def test_a_mailbox_that_cannot_be_written_fails_only_its_copy(tmp_path: Path) -> None:
    (tmp_path / "blocked@x.example").write_text("a file where the Maildir should be")

    async def main() -> tuple[object, object]:
        agent = LocalAgent(lambda address: tmp_path / address)
        try:
            bad, good = await asyncio.gather(agent.deliver(job(1, "blocked@x.example")),
                                             agent.deliver(job(2, "fine@x.example")))
        finally:
            await agent.close()
        return next(iter(bad.values())), next(iter(good.values()))

    bad, good = asyncio.run(main())
    assert isinstance(bad, TemporaryFailure) and bad.code == 451
    assert isinstance(good, Delivered)


def test_a_copy_does_not_wait_for_a_slow_batch_while_a_writer_is_free(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writers: a detour copy need not wait for the fsyncs of the mailbox copy of the same
    message, written a moment before."""
    release = threading.Event()
    real = local.maildir.deliver_many

    def slow_for_box1(messages: list[tuple[Path, bytes]]) -> list[str | OSError]:
        if any(root.name == "box1@x.example" for root, _ in messages):
            release.wait(10)
        return real(messages)

    monkeypatch.setattr(local.maildir, "deliver_many", slow_for_box1)

    async def main() -> tuple[bool, object, object]:
        agent = LocalAgent(lambda address: tmp_path / address)
        try:
            slow = asyncio.ensure_future(agent.deliver(job(1, "box1@x.example")))
            await asyncio.sleep(0)
            quick = await asyncio.wait_for(agent.deliver(job(2, "box2@x.example")), 10)
            slow_still_writing = not slow.done()
            release.set()
            return slow_still_writing, next(iter(quick.values())), next(iter((await slow).values()))
        finally:
            release.set()
            await agent.close()

    slow_still_writing, quick, slow = asyncio.run(main())
    assert slow_still_writing
    assert isinstance(quick, Delivered) and isinstance(slow, Delivered)
