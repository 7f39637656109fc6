"""The retention sweeper (store.retention) against the in-memory store: what is due goes, what is
not stays, and a failing sweep is logged and tried again instead of stopping the server."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from maildetour.store.records import Event, Message, NewCopy
from maildetour.store.retention import RetentionRules, Sweeper
from tests.fakes import MemoryStore

DAY = 86400.0


async def finished(store: MemoryStore, queue_id: str, at: float, state: str = "delivered") -> None:
    [copy] = await store.accept(Message(queue_id, "a@b.example", at, "", 5, "c"), b"x", [NewCopy("r@x", "t@x", False)],
                                [Event(at, queue_id, None, "accepted", "r@x", "")])
    await store.update(replace(copy, state=state), [Event(at, queue_id, copy.id, state, "t@x", "")])  # type: ignore[arg-type]
    await store.finish(queue_id)


def test_a_sweep_removes_what_is_due_and_expires_old_quarantine() -> None:
    async def main() -> tuple[list[str], list[str]]:
        store = MemoryStore()
        await finished(store, "OLD", 1 * DAY)
        await finished(store, "NEW", 39 * DAY)
        await finished(store, "QUARANTINED", 1 * DAY, "quarantined")
        rules = RetentionRules(retention=30 * DAY, quarantine_retention=20 * DAY, interval=600.0, pause=0.0)
        swept = await Sweeper(store, rules, lambda: 40 * DAY).sweep()
        assert (swept.purged, swept.expired) == (1, 1)
        return sorted(store.messages), [c.state for c in store.copies.values() if c.queue_id == "QUARANTINED"]

    assert asyncio.run(main()) == (["NEW", "QUARANTINED"], ["deleted"])


def test_a_failing_sweep_is_logged_and_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    class Failing(MemoryStore):
        calls = 0

        async def purge_finished(self, before: float, now: float, limit: int) -> int:
            self.calls += 1
            if self.calls == 1:
                raise OSError(28, "No space left on device")
            return await super().purge_finished(before, now, limit)

    async def main() -> int:
        store = Failing()
        await finished(store, "OLD", 1 * DAY)
        sweeper = Sweeper(store, RetentionRules(30 * DAY, None, interval=0.01, pause=0.0), lambda: 40 * DAY)
        task = asyncio.create_task(sweeper.run())
        while store.messages and store.calls < 100:
            await asyncio.sleep(0.01)
        task.cancel()
        return store.calls

    with caplog.at_level(logging.INFO, "maildetour.store"):
        assert asyncio.run(main()) >= 2
    assert "retention sweep failed (OSError" in caplog.text
    assert "retention: removed 1 finished messages" in caplog.text
