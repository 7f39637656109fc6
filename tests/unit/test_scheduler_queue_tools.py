"""Issue 12, the scheduler under the queue tools: each attempt marks its copies in the store
until it reports, and a re-read of the queue (SIGUSR2) picks up copies the operator made due
earlier (`queue flush ID|--dest`) without mistaking an update still on its way for a flush."""

import asyncio
from dataclasses import replace
from pathlib import Path

from maildetour.core.outcome import Delivered, Outcome, TemporaryFailure
from maildetour.store.records import Message, NewCopy
from tests.configs import seed_config
from tests.fakes import MemoryStore, ScriptedAgent
from tests.unit.test_scheduler import CHAIN, HIDDEN, Clock, ok, scheduler_for


def test_an_attempt_marks_its_copies_in_flight_until_it_reports(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    seen: list[dict[int, float]] = []

    class Watching(ScriptedAgent):
        async def deliver(self, job):  # type: ignore[no-untyped-def]
            seen.append(dict(store.marks))
            return await super().deliver(job)

    scheduler = scheduler_for(config, store, Watching(ok), ScriptedAgent(ok), clock)

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        made = await store.accept(Message("Q1", "a@b.example", clock.now, "", 1, "c"), b"x\r\n",
                                  [NewCopy("ituki@example.com", HIDDEN, True)], [])
        scheduler.submit(made)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if store.finished:
                break
        task.cancel()

    asyncio.run(main())
    assert seen == [{1: clock.now}]
    assert store.marks == {} and store.copies[1].state == "delivered"


def test_a_reread_queue_sends_the_copy_the_operator_flushed_and_no_other(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()

    tried: list[str] = []

    def first_fails(rcpt: str, n: int) -> Outcome:  # each message's first attempt: both go to one address
        tried.append(rcpt)
        return TemporaryFailure("451 4.3.0 later") if len(tried) <= 2 else Delivered("250 ok")

    smtp = ScriptedAgent(first_fails)
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock)

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        for queue_id in ("Q1", "Q2"):
            made = await store.accept(Message(queue_id, "a@b.example", clock.now, "", 1, "c"), b"x\r\n",
                                      [NewCopy("ituki@example.com", HIDDEN, True)], [])
            scheduler.submit(made)
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert [c.attempts for c in store.copies.values()] == [1, 1]  # both wait for their retry
        # The store says Q1's copy is due earlier, but with an attempt count the scheduler has
        # not seen written: an update on its way, not a flush. Nothing moves.
        waiting = store.copies[1]
        store.copies[1] = replace(waiting, next_at=clock.now, attempts=0)
        scheduler.reload()
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert len(smtp.jobs) == 2
        store.copies[1] = waiting  # (the update committed)
        await store.flush(clock.now, queue_id="Q2")  # the operator: `queue flush Q2`
        scheduler.reload()  # and SIGUSR2
        for _ in range(50):
            await asyncio.sleep(0.01)
            if store.finished:
                break
        task.cancel()

    asyncio.run(main())
    assert [j.queue_id for j in smtp.jobs] == ["Q1", "Q2", "Q2"]
    assert store.finished == ["Q2"] and store.copies[1].state == "queued"
