"""The scheduler with fakes: immediate delivery, detour chains, quarantine, private DSNs, restart."""

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from maildetour.config import Config
from maildetour.core.outcome import Delivered, Outcome, PermanentFailure, TemporaryFailure
from maildetour.core.redact import Redactor
from maildetour.delivery.bounces import DsnWriter
from maildetour.delivery.scheduler import Scheduler
from maildetour.store.records import Event, Message, NewCopy
from tests.configs import SEED, seed_config
from tests.fakes import MemoryStore, ScriptedAgent

HIDDEN, PC, DETOUR = "ituki-ex@gmail.com", "ituki@pc.example.net", "ituki@gm.example.net"
CHAIN = SEED + """
[mailbox."last@example.com"]
password = "x"
[forward."team@example.com"]
to = ["friend@example.org"]
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def scheduler_for(config: Config, store: MemoryStore, smtp: Any, local: Any, clock: Any,
                  private: frozenset[str] = frozenset(), max_parallel: int = 200, **active: Any) -> Scheduler:
    """`active`: `horizon` and `active_limit` (the copies held in memory), when not the defaults."""
    dsn = DsnWriter(store=store, hostname="mx.example.com", redactor=Redactor(private))
    return Scheduler(store=store, table=config.routing_table(), agents={"smtp": smtp, "local": local},
                     retry=config.delivery.retry, max_parallel=max_parallel, dsn=dsn, keep_for=None,
                     clock=clock, **active)


def run(tmp_path: Path, smtp: ScriptedAgent, local: ScriptedAgent, copies: list[tuple[str, str]],
        *, sender: str = "alice@sender.example", until: int = 1, text: str = CHAIN) -> MemoryStore:
    """Accept one message with `copies` (recipient, target), run the scheduler until the store
    has `until` finished messages (or 2 s pass), and return the store."""
    config = seed_config(tmp_path, text)
    store, clock = MemoryStore(), Clock()
    table = config.routing_table()
    scheduler = scheduler_for(config, store, smtp, local, clock, frozenset({HIDDEN, "friend@example.org"}))

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        message = Message("Q1", sender, clock.now, "<m@x>", 10, "client [127.0.0.1]")
        new = [NewCopy(r, t, table.is_hidden(t)) for r, t in copies]
        made = await store.accept(message, b"Subject: hi\r\n\r\nbody\r\n", new,
                                  [Event(clock.now, "Q1", None, "accepted", "", "")])
        scheduler.submit(made)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(store.finished) >= until:
                break
        task.cancel()

    asyncio.run(main())
    return store


def ok(rcpt: str, n: int) -> Outcome:
    return Delivered("250 ok")


def test_every_copy_is_delivered_at_once_in_one_job_per_kind(tmp_path: Path) -> None:
    smtp, local = ScriptedAgent(ok), ScriptedAgent(ok)
    store = run(tmp_path, smtp, local, [("ituki@example.com", PC), ("ituki@example.com", HIDDEN)])
    assert [j.recipients for j in smtp.jobs] == [(HIDDEN,)]
    assert [j.recipients for j in local.jobs] == [(PC,)]
    assert {c.state for c in store.copies.values()} == {"delivered"}
    assert store.finished == ["Q1"]


def test_a_refused_hidden_copy_detours_and_the_sender_gets_nothing(tmp_path: Path) -> None:
    smtp = ScriptedAgent(lambda r, n: PermanentFailure("552 5.7.0 virus"))
    local = ScriptedAgent(ok)
    store = run(tmp_path, smtp, local, [("ituki@example.com", HIDDEN)])
    assert store.kinds("Q1")[1:] == [("refused", HIDDEN), ("detoured", DETOUR), ("delivered", DETOUR)]
    assert [j.recipients for j in local.jobs] == [(DETOUR,)]
    assert len(store.messages) == 1  # no DSN message was created


def test_when_the_detour_fails_too_the_copy_is_quarantined_without_a_dsn(tmp_path: Path) -> None:
    text = CHAIN.replace('detour       = "ituki@gm.example.net"', 'detour       = "backup@example.net"')
    smtp = ScriptedAgent(lambda r, n: PermanentFailure("550 5.7.1 no"))
    store = run(tmp_path, smtp, ScriptedAgent(ok), [("ituki@example.com", HIDDEN)], text=text)
    kinds = [k for k, _ in store.kinds("Q1")]
    assert kinds[-1] == "quarantined" and "bounced" not in kinds
    assert len(store.messages) == 1
    [copy] = store.copies.values()
    assert copy.state == "quarantined" and copy.target == "backup@example.net" and copy.detours == 1


def test_an_ordinary_forward_refused_for_good_sends_a_private_dsn(tmp_path: Path) -> None:
    smtp = ScriptedAgent(lambda r, n: PermanentFailure("550 5.1.1 <friend@example.org> unknown")
                         if r == "friend@example.org" else Delivered("250 ok"))
    store = run(tmp_path, smtp, ScriptedAgent(ok), [("team@example.com", "friend@example.org")], until=2)
    assert ("bounced", "friend@example.org") in store.kinds("Q1")
    [dsn_id] = [q for q in store.messages if q != "Q1"]
    dsn_message, dsn = store.messages[dsn_id]
    assert dsn_message.mail_from == ""
    assert b"team@example.com" in dsn and b"friend" not in dsn
    assert [j.recipients for j in smtp.jobs][-1] == ("alice@sender.example",)


def test_temporary_failures_are_retried_not_detoured_before_detour_after(tmp_path: Path) -> None:
    smtp = ScriptedAgent(lambda r, n: TemporaryFailure("451 4.3.0 later"))
    store = run(tmp_path, smtp, ScriptedAgent(ok), [("ituki@example.com", HIDDEN)])
    [copy] = store.copies.values()
    assert copy.state == "queued" and copy.attempts == 1 and copy.first_failure is not None
    assert copy.next_at == copy.first_failure + 60  # retry_first default
    assert store.finished == []


def test_at_start_up_unfinished_copies_are_delivered_again(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store = MemoryStore()
    smtp, local = ScriptedAgent(ok), ScriptedAgent(ok)

    async def main() -> None:
        made = await store.accept(Message("Q0", "a@b.example", 5.0, "", 1, "c"), b"x\r\n",
                                  [NewCopy("ituki@example.com", HIDDEN, True)], [])
        assert made[0].state == "queued"
        scheduler = scheduler_for(config, store, smtp, local, Clock())
        task = asyncio.create_task(scheduler.run())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if store.finished:
                break
        task.cancel()

    asyncio.run(main())
    assert [j.recipients for j in smtp.jobs] == [(HIDDEN,)]
    assert store.finished == ["Q0"]


def test_a_large_backlog_is_worked_off_with_bounded_parallel_attempts(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store = MemoryStore()

    class Slow:
        def __init__(self) -> None:
            self.now = self.peak = self.done = 0

        def batch_key(self, target: str) -> str:
            return ""

        async def deliver(self, job):  # type: ignore[no-untyped-def]
            self.now += 1
            self.peak = max(self.peak, self.now)
            await asyncio.sleep(0.001)
            self.now -= 1
            self.done += 1
            return {r: Delivered("250 ok") for r in job.recipients}

        async def close(self) -> None:
            pass

    slow = Slow()

    async def main() -> None:
        for i in range(60):
            await store.accept(Message(f"Q{i:03}", "a@b.example", 5.0, "", 1, "c"), b"x\r\n",
                               [NewCopy("ituki@example.com", HIDDEN, True)], [])
        scheduler = scheduler_for(config, store, slow, slow, Clock(), max_parallel=3)
        task = asyncio.create_task(scheduler.run())
        for _ in range(500):
            await asyncio.sleep(0.01)
            if len(store.finished) == 60:
                break
        task.cancel()

    asyncio.run(main())
    assert slow.done == 60 and len(store.finished) == 60
    assert slow.peak <= 3


def test_a_late_report_about_a_delivered_hidden_copy_sends_it_down_its_detour(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    smtp, local = ScriptedAgent(ok), ScriptedAgent(ok)
    scheduler = scheduler_for(config, store, smtp, local, clock)

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        [made] = await store.accept(Message("Q1", "a@b.example", clock.now, "", 1, "c"), b"x\r\n",
                                    [NewCopy("ituki@example.com", HIDDEN, True)], [])
        scheduler.submit([made])
        while store.copies[made.id].state != "delivered":
            await asyncio.sleep(0.01)
        late = PermanentFailure("late bounce Q9: 5.7.1 spam", 550, "5.7.1")
        await scheduler.report(store.copies[made.id], late)
        await scheduler.report(store.copies[made.id], late)  # a second report about it changes nothing
        for _ in range(100):
            await asyncio.sleep(0.01)
            if store.copies[made.id].state == "delivered" and store.copies[made.id].target == DETOUR:
                break
        task.cancel()

    asyncio.run(main())
    assert store.kinds("Q1") == [("delivered", HIDDEN), ("refused", HIDDEN), ("detoured", DETOUR),
                                 ("delivered", DETOUR)]
    assert [j.recipients for j in local.jobs] == [(DETOUR,)]


def test_a_copy_the_operator_holds_during_its_attempt_is_not_scheduled_again(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()

    class HoldsMidway(ScriptedAgent):
        async def deliver(self, job):  # type: ignore[no-untyped-def]
            await store.hold(job.queue_id, clock.now)  # the operator, while the attempt runs
            return await super().deliver(job)

    smtp = HoldsMidway(lambda r, n: TemporaryFailure("451 4.3.0 later"))
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock)

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        made = await store.accept(Message("Q1", "a@b.example", clock.now, "", 1, "c"), b"x\r\n",
                                  [NewCopy("ituki@example.com", HIDDEN, True)], [])
        scheduler.submit(made)
        for _ in range(20):
            await asyncio.sleep(0.01)
        scheduler.flush()  # a flush tries every queued copy: the held one is not among them
        for _ in range(20):
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert len(smtp.jobs) == 1
    [copy] = store.copies.values()
    assert copy.state == "held"


def test_a_hidden_copy_travels_alone_even_beside_another_address_at_the_same_host(tmp_path: Path) -> None:
    text = CHAIN + '\n[forward."both@example.com"]\nto = ["ituki-ex@gmail.com", "pal@gmail.com", "bud@gmail.com"]\n'
    smtp = ScriptedAgent(ok)
    run(tmp_path, smtp, ScriptedAgent(ok), [("both@example.com", HIDDEN), ("both@example.com", "pal@gmail.com"),
                                            ("both@example.com", "bud@gmail.com")], text=text)
    assert sorted(j.recipients for j in smtp.jobs) == [("ituki-ex@gmail.com",), ("pal@gmail.com", "bud@gmail.com")]


def test_an_agent_that_raises_is_a_recorded_temporary_failure_not_a_silent_loop(tmp_path: Path) -> None:
    """Issue 10 #1: every exception while attempting a copy becomes an outcome with an event."""

    class Broken(ScriptedAgent):
        async def deliver(self, job):  # type: ignore[no-untyped-def]
            self.jobs.append(job)
            raise RuntimeError("a bug that must not leak its text")

    smtp = Broken(ok)
    store = run(tmp_path, smtp, ScriptedAgent(ok), [("ituki@example.com", HIDDEN)])
    [copy] = store.copies.values()
    assert copy.state == "queued" and copy.attempts == 1 and copy.first_failure is not None
    [deferred] = [e for e in store.events if e.kind == "deferred"]
    assert "internal error while delivering (RuntimeError)" in deferred.detail
    assert "must not leak" not in deferred.detail


def test_a_copy_rescheduled_while_its_attempt_settles_is_not_lost(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    scheduler = scheduler_for(config, store, ScriptedAgent(ok), ScriptedAgent(ok), clock)

    async def main() -> tuple[list[list[int]], list[list[int]]]:
        [made] = await store.accept(Message("Q1", "a@b.example", clock.now, "", 1, "c"), b"x\r\n",
                                    [NewCopy("ituki@example.com", HIDDEN, True)], [])
        token = object()
        scheduler._busy[made.id] = token  # its attempt is still settling ...
        scheduler._schedule(made)  # ... and it is due again (its next detour step)
        while_busy = [[c.id for c in g] for g in scheduler._due_groups(clock.now, 10)]
        scheduler._free([made], token)
        after = [[c.id for c in g] for g in scheduler._due_groups(clock.now, 10)]
        return while_busy, after

    while_busy, after = asyncio.run(main())
    assert while_busy == [] and after == [[1]]


def test_a_destination_that_says_slow_down_waits_as_a_whole(tmp_path: Path) -> None:
    """Issue 10, rate control out: after Gmail's 421 4.7.28 nothing else goes to gmail.com until
    the wait is over (no storm of retries), and the wait counts toward detour_after."""
    config = seed_config(tmp_path, CHAIN.replace('detour_after = "10m"', 'detour_after = "90s"'))
    store, clock = MemoryStore(), Clock()
    slow = TemporaryFailure("421 4.7.28 unusual rate", 421, "4.7.28", "rate limited", slow_down=True)
    smtp = ScriptedAgent(lambda r, n: slow)
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock)

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        for i in range(2):
            made = await store.accept(Message(f"Q{i}", "a@b.example", clock.now, "", 1, "c"), b"x\r\n",
                                      [NewCopy("ituki@example.com", HIDDEN, True)], [])
            scheduler.submit(made)
            await asyncio.sleep(0.05)
        assert len(smtp.jobs) == 1  # the second copy was not tried: gmail.com asked us to wait
        clock.now += 61  # the wait (retry_first) is over: the next one is tried, says slow down
        scheduler.flush()  # again, and the other waits again (for twice as long now)
        await asyncio.sleep(0.05)
        assert len(smtp.jobs) == 2
        clock.now += 121  # the wait is over again, and detour_after (90s) has passed
        scheduler.flush()
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(main())
    second = [e for e in store.events if e.queue_id == "Q1"]
    assert [e.kind for e in second][:1] == ["deferred"] and "asked us to slow down" in second[0].detail
    assert {c.target for c in store.copies.values()} == {DETOUR}  # both moved on; never a refusal
    assert len(smtp.jobs) == 3 and "refused" not in [e.kind for e in store.events]


def test_deliveries_to_one_destination_are_paced_by_destination_rate_delay(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    smtp = ScriptedAgent(ok)
    dsn = DsnWriter(store=store, hostname="mx.example.com", redactor=Redactor(frozenset()))
    scheduler = Scheduler(store=store, table=config.routing_table(), agents={"smtp": smtp, "local": ScriptedAgent(ok)},
                          retry=config.delivery.retry, max_parallel=10, dsn=dsn, keep_for=None, clock=clock,
                          rate_delay=30.0)

    async def main() -> list[int]:
        task = asyncio.create_task(scheduler.run())
        seen = []
        for i in range(3):
            made = await store.accept(Message(f"Q{i}", "a@b.example", clock.now, "", 1, "c"), b"x\r\n",
                                      [NewCopy("ituki@example.com", HIDDEN, True)], [])
            scheduler.submit(made)
        await asyncio.sleep(0.05)
        seen.append(len(smtp.jobs))
        clock.now += 30
        scheduler.flush()
        await asyncio.sleep(0.05)
        seen.append(len(smtp.jobs))
        task.cancel()
        return seen

    assert asyncio.run(main()) == [1, 2]


def test_attempts_in_flight_hold_no_more_message_bytes_than_allowed(tmp_path: Path) -> None:
    """Issue 10, memory: 200 attempts of 25 MB messages must not hold 5 GB at once."""
    config = seed_config(tmp_path, CHAIN)
    store = MemoryStore()

    class Slow:
        def __init__(self) -> None:
            self.now = self.peak = self.done = 0

        def batch_key(self, target: str) -> str:
            return ""

        async def deliver(self, job):  # type: ignore[no-untyped-def]
            self.now += 1
            self.peak = max(self.peak, self.now)
            await asyncio.sleep(0.01)
            self.now -= 1
            self.done += 1
            return {r: Delivered("250 ok") for r in job.recipients}

        async def close(self) -> None:
            pass

    slow = Slow()

    async def main() -> None:
        for i in range(12):  # 12 messages of "25 MB" (the size the store recorded)
            await store.accept(Message(f"Q{i:03}", "a@b.example", 5.0, "", 25 * 1024 * 1024, "c"), b"x\r\n",
                               [NewCopy("ituki@example.com", HIDDEN, True)], [])
        dsn = DsnWriter(store=store, hostname="mx.example.com", redactor=Redactor(frozenset()))
        scheduler = Scheduler(store=store, table=config.routing_table(), agents={"smtp": slow, "local": slow},
                              retry=config.delivery.retry, max_parallel=200, dsn=dsn, keep_for=None, clock=Clock(),
                              max_bytes=100 * 1024 * 1024)
        task = asyncio.create_task(scheduler.run())
        for _ in range(300):
            await asyncio.sleep(0.01)
            if len(store.finished) == 12:
                break
        task.cancel()

    asyncio.run(main())
    assert slow.done == 12 and slow.peak == 4  # 100 MB / 25 MB: four at a time, all of them done


def test_a_store_that_cannot_write_pauses_deliveries_and_the_copy_is_tried_again_when_it_can(tmp_path: Path) -> None:
    """Found by the reliability run (a full disk): an outcome the store cannot record used to
    end the scheduler (and the server). Now the copy is read again from the store, nothing
    starts while the store says it cannot write, and delivery resumes when it can."""
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    smtp, local = ScriptedAgent(ok), ScriptedAgent(ok)
    scheduler = scheduler_for(config, store, smtp, local, clock)
    scheduler.store_recheck = 0.05

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.01)  # started: the queue was read (a read now would fail too)
        store.fail_update, store.problem = OSError(28, "No space left on device"), "no space left in var"
        message = Message("Q1", "alice@sender.example", clock.now, "<m@x>", 10, "client [127.0.0.1]")
        made = await store.accept(message, b"Subject: hi\r\n\r\nbody\r\n", [NewCopy("ituki@example.com", HIDDEN, True)],
                                  [Event(clock.now, "Q1", None, "accepted", "", "")])
        scheduler.submit(made)
        await asyncio.sleep(0.2)
        scheduler.reload()  # SIGUSR2 meanwhile: its read fails too (the review found it ended the scheduler)
        await asyncio.sleep(0.3)  # many rechecks: the store still cannot write
        assert not task.done() and len(smtp.jobs) == 1
        assert store.copies[made[0].id].state == "queued"  # nothing recorded, nothing lost
        store.fail_update, store.problem = None, None
        for _ in range(200):
            await asyncio.sleep(0.01)
            if store.copies[made[0].id].state == "delivered":
                break
        task.cancel()

    asyncio.run(main())
    assert len(smtp.jobs) == 2  # tried once more (at-least-once), then recorded
    assert [c.state for c in store.copies.values()] == ["delivered"]


def test_an_unreadable_spool_file_is_a_temporary_failure_with_backoff_not_a_spin(tmp_path: Path) -> None:
    """The review found a read error (EIO, permissions) taken for a store that cannot write:
    the copy was dispatched again at once, 20,000 reads a second. Now it is a recorded
    temporary failure of that copy, retried by the usual rules."""
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    smtp, local = ScriptedAgent(ok), ScriptedAgent(ok)
    scheduler = scheduler_for(config, store, smtp, local, clock)

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        store.fail_read = PermissionError(13, "Permission denied")
        message = Message("Q1", "alice@sender.example", clock.now, "<m@x>", 10, "client [127.0.0.1]")
        made = await store.accept(message, b"Subject: hi\r\n\r\nbody\r\n", [NewCopy("ituki@example.com", HIDDEN, True)],
                                  [Event(clock.now, "Q1", None, "accepted", "", "")])
        scheduler.submit(made)
        await asyncio.sleep(0.3)
        assert not task.done()
        task.cancel()

    asyncio.run(main())
    assert store.reads == 1 and smtp.jobs == []
    [copy] = store.copies.values()
    assert copy.state == "queued" and copy.attempts == 1 and copy.next_at > 1_000_000.0
    assert any(e.kind == "deferred" and "could not be read from the spool" in e.detail for e in store.events)


# --- memory holds only the copies due soon (issue 13) ---------------------------------------------
async def _settle_down(until: Any, turns: int = 200) -> None:
    """Let the scheduler work (real time: a few ms a turn) until `until()` or `turns` pass."""
    for _ in range(turns):
        await asyncio.sleep(0.01)
        if until():
            return


def _later(scheduler: Scheduler, clock: Clock, seconds: float) -> None:
    """The (fake) clock moves on; the scheduler notices at once (as the real one would once its
    timer ran out)."""
    clock.now += seconds
    scheduler._wake.set()


async def _accept(store: MemoryStore, queue_id: str, at: float, *targets: str) -> list[Any]:
    return await store.accept(Message(queue_id, "alice@sender.example", at, "", 1, "c"), b"x\r\n",
                              [NewCopy("ituki@example.com", t, t == HIDDEN) for t in targets], [])


def test_a_copy_due_beyond_the_horizon_is_left_to_the_store_and_delivered_when_its_time_comes(
        tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    smtp = ScriptedAgent(lambda r, n: TemporaryFailure("451 4.3.0 later") if n == 1 else Delivered("250 ok"))
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock, horizon=30.0)

    async def main() -> tuple[int, int, int]:
        task = asyncio.create_task(scheduler.run())
        scheduler.submit(await _accept(store, "Q1", clock.now, HIDDEN))
        await _settle_down(lambda: store.copies[1].attempts == 1)
        await asyncio.sleep(0.05)
        held, depth, tried = len(scheduler._copies), scheduler.queue_depth(), len(smtp.jobs)
        _later(scheduler, clock, 35)  # the horizon nears its due time: read from the store, held, not due yet
        await asyncio.sleep(0.05)
        assert len(smtp.jobs) == 1 and len(scheduler._copies) == 1
        _later(scheduler, clock, 26)  # its retry time (first failure + 60 s) has come
        await _settle_down(lambda: bool(store.finished))
        task.cancel()
        return held, depth, tried

    held, depth, tried = asyncio.run(main())
    assert (held, depth, tried) == (0, 1, 1)  # deferred for 60 s, beyond the 30 s horizon: in the store only
    assert len(smtp.jobs) == 2 and store.copies[1].state == "delivered" and store.finished == ["Q1"]


def test_active_limit_caps_the_copies_held_and_the_rest_go_out_as_held_ones_finish(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    held: list[int] = []

    class Watching(ScriptedAgent):
        async def deliver(self, job):  # type: ignore[no-untyped-def]
            held.append(len(scheduler._copies))
            await asyncio.sleep(0.002)
            return await super().deliver(job)

    smtp = Watching(ok)
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock, max_parallel=2, active_limit=10)

    async def main() -> None:
        for i in range(25):  # queued before the start (a restart with a backlog)
            await _accept(store, f"Q{i:02}", clock.now - 100 + i, HIDDEN)
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.02)
        # New mail while the backlog is worked off: a burst larger than the limit.
        for i in range(25, 40):
            scheduler.submit(await _accept(store, f"Q{i:02}", clock.now, HIDDEN))
        assert len(scheduler._copies) <= 10
        await _settle_down(lambda: len(store.finished) == 40, turns=500)
        task.cancel()

    asyncio.run(main())
    assert sorted(store.finished) == [f"Q{i:02}" for i in range(40)]
    assert len(smtp.jobs) == 40 and max(held) <= 10
    assert [j.queue_id for j in smtp.jobs][:25] == [f"Q{i:02}" for i in range(25)]  # soonest first


def test_a_message_split_between_memory_and_store_is_finished_only_once_all_its_copies_are_final(
        tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()

    class SlowBox(ScriptedAgent):
        async def deliver(self, job):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.05)  # the hidden copy's retry is left to the store first
            return await super().deliver(job)

    smtp = ScriptedAgent(lambda r, n: TemporaryFailure("451 4.3.0 later") if n == 1 else Delivered("250 ok"))
    scheduler = scheduler_for(config, store, smtp, SlowBox(ok), clock, horizon=30.0)

    async def main() -> list[str]:
        task = asyncio.create_task(scheduler.run())
        scheduler.submit(await _accept(store, "Q1", clock.now, PC, HIDDEN))
        await _settle_down(lambda: store.copies[1].state == "delivered")
        await asyncio.sleep(0.05)
        midway = list(store.finished)  # PC delivered (the last copy held), the hidden one waits in the store
        _later(scheduler, clock, 61)
        await _settle_down(lambda: store.copies[2].state == "delivered")
        await asyncio.sleep(0.05)
        task.cancel()
        return midway

    midway = asyncio.run(main())
    assert midway == []
    assert store.finished == ["Q1"]


def test_flush_makes_copies_in_the_store_only_due_now(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    smtp = ScriptedAgent(lambda r, n: TemporaryFailure("451 4.3.0 later") if n == 1 else Delivered("250 ok"))
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock, horizon=30.0)

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        scheduler.submit(await _accept(store, "Q1", clock.now, HIDDEN))
        await _settle_down(lambda: store.copies[1].attempts == 1)
        await asyncio.sleep(0.05)
        assert len(scheduler._copies) == 0 and len(smtp.jobs) == 1
        scheduler.flush()  # SIGUSR1: the clock stands still, the copy is due in 60 s
        await _settle_down(lambda: bool(store.finished))
        task.cancel()

    asyncio.run(main())
    assert len(smtp.jobs) == 2 and store.finished == ["Q1"]
    assert ("flushed", "") in store.kinds("Q1")


def test_a_reread_after_the_operator_changed_the_queue_drops_and_picks_up_copies(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    smtp = ScriptedAgent(lambda r, n: TemporaryFailure("451 4.3.0 later") if n == 1 else Delivered("250 ok"))
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock, horizon=120.0)

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        scheduler.submit(await _accept(store, "Q1", clock.now, HIDDEN))
        await _settle_down(lambda: store.copies[1].attempts == 1)
        assert len(scheduler._copies) == 1  # its retry in 60 s is within the horizon: held
        # Held by the operator elsewhere (`queue hold`, the notice not sent), then a message held
        # since before: both only in the store.
        await store.hold("Q1", clock.now)
        await store.accept(Message("Q2", "a@b.example", clock.now, "", 1, "c"), b"x\r\n",
                           [NewCopy("ituki@example.com", HIDDEN, True, state="held")], [])
        scheduler.reload()  # SIGUSR2
        await asyncio.sleep(0.05)
        assert len(scheduler._copies) == 0
        await store.release("Q2", clock.now)
        scheduler.reload()
        await _settle_down(lambda: bool(store.finished))
        _later(scheduler, clock, 61)  # Q1's retry time: it is held, not tried
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert [j.queue_id for j in smtp.jobs] == ["Q1", "Q2"]
    assert store.finished == ["Q2"] and store.copies[1].state == "held"


def test_at_start_up_the_soonest_copies_are_read_and_the_later_ones_wait_in_the_store(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    smtp = ScriptedAgent(ok)
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock, active_limit=5)

    async def main() -> tuple[int, int, int]:
        for i in range(15):  # what a crash left: 12 due (some were in flight), 3 deferred for an hour
            [copy] = await _accept(store, f"Q{i:02}", clock.now - 600, HIDDEN)
            if i >= 12:
                store.copies[copy.id] = replace(copy, attempts=1, next_at=clock.now + 3600)
        task = asyncio.create_task(scheduler.run())
        await _settle_down(lambda: len(store.finished) == 12)
        await asyncio.sleep(0.05)
        seen = len(smtp.jobs), len(scheduler._copies), scheduler.queue_depth()
        _later(scheduler, clock, 3600)
        await _settle_down(lambda: len(store.finished) == 15)
        task.cancel()
        return seen

    assert asyncio.run(main()) == (12, 0, 3)
    assert len(smtp.jobs) == 15 and len(store.finished) == 15


def test_a_start_up_read_that_fails_waits_for_the_store_and_does_not_end_the_scheduler(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    smtp = ScriptedAgent(ok)
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock)
    scheduler.store_recheck = 0.05

    async def main() -> None:
        await _accept(store, "Q1", clock.now, HIDDEN)
        store.fail_update, store.problem = OSError(5, "Input/output error"), "the disk fails"
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.2)
        assert not task.done() and smtp.jobs == []
        store.fail_update, store.problem = None, None
        await _settle_down(lambda: bool(store.finished))
        task.cancel()

    asyncio.run(main())
    assert len(smtp.jobs) == 1 and store.finished == ["Q1"]


def test_a_copy_another_node_holds_is_not_attempted_here(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    smtp = ScriptedAgent(ok)
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock)

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        [theirs] = await _accept(store, "Q1", clock.now, HIDDEN)
        store.elsewhere.add(theirs.id)  # another node leased it meanwhile (several nodes)
        scheduler.submit([theirs])
        scheduler.submit(await _accept(store, "Q2", clock.now, HIDDEN))
        await _settle_down(lambda: bool(store.finished))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert [j.queue_id for j in smtp.jobs] == ["Q2"] and store.claims == [[1], [2]]
    assert store.copies[1].state == "queued" and store.finished == ["Q2"]


def test_the_queue_gauges_count_the_copies_in_the_store_only(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    scheduler = scheduler_for(config, store, ScriptedAgent(ok), ScriptedAgent(ok), clock, horizon=30.0)

    async def main() -> tuple[float, float]:
        for i in range(3):
            [copy] = await _accept(store, f"Q{i}", clock.now - 900 + i * 300, HIDDEN)
            store.copies[copy.id] = replace(copy, attempts=1, next_at=clock.now + 3600)  # deferred an hour
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.05)
        first = scheduler.oldest_age()  # asks the store: the next scrape has its answer
        await asyncio.sleep(0.05)
        task.cancel()
        return first, scheduler.oldest_age()

    first, then = asyncio.run(main())
    assert scheduler.queue_depth() == 3 and len(scheduler._copies) == 0
    assert first == 0.0 and then == 900.0


def test_a_copy_finished_while_a_read_of_the_queue_was_on_its_way_is_not_taken_back(tmp_path: Path) -> None:
    """The read may predate the update that finished the copy: it must not be sent twice."""
    config = seed_config(tmp_path, CHAIN)
    clock = Clock()
    gate, answer = asyncio.Event(), asyncio.Event()

    class SlowRead(MemoryStore):
        async def due(self, before: float, limit: int) -> Any:
            found = await super().due(before, limit)  # as the store was when the read began
            await gate.wait()
            return found

    class Waits(ScriptedAgent):
        async def deliver(self, job):  # type: ignore[no-untyped-def]
            await answer.wait()
            return await super().deliver(job)

    store = SlowRead()
    smtp = Waits(ok)
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock)

    async def main() -> None:
        gate.set()
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.02)  # the start-up read is done
        gate.clear()
        scheduler.submit(await _accept(store, "Q1", clock.now, HIDDEN))
        await asyncio.sleep(0.02)  # its attempt waits for the answer
        scheduler.reload()  # a read begins: the copy is queued in it
        await asyncio.sleep(0.02)
        answer.set()  # delivered (and forgotten) while the read is on its way
        await _settle_down(lambda: bool(store.finished))
        gate.set()
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(main())
    assert len(smtp.jobs) == 1 and store.finished == ["Q1"] and scheduler._copies == {}


def test_a_burst_of_new_mail_beyond_active_limit_waits_in_the_store_and_all_of_it_goes_out(tmp_path: Path) -> None:
    config = seed_config(tmp_path, CHAIN)
    store, clock = MemoryStore(), Clock()
    answer = asyncio.Event()

    class Waits(ScriptedAgent):
        async def deliver(self, job):  # type: ignore[no-untyped-def]
            await answer.wait()
            return await super().deliver(job)

    smtp = Waits(ok)
    scheduler = scheduler_for(config, store, smtp, ScriptedAgent(ok), clock, max_parallel=2, active_limit=10)

    async def main() -> tuple[int, int]:
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.02)  # the queue was read: empty, the horizon 300 s ahead
        for i in range(30):  # new mail faster than it goes out
            clock.now += 0.001
            scheduler.submit(await _accept(store, f"Q{i:02}", clock.now, HIDDEN))
        seen = len(scheduler._copies), scheduler.queue_depth()
        answer.set()
        await _settle_down(lambda: len(store.finished) == 30, turns=500)
        task.cancel()
        return seen

    held, depth = asyncio.run(main())
    assert held <= 10 and depth == 30
    assert sorted(store.finished) == [f"Q{i:02}" for i in range(30)] and len(smtp.jobs) == 30
