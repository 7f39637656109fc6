"""The scheduler with fakes: immediate delivery, detour chains, quarantine, private DSNs, restart."""

import asyncio
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
                  private: frozenset[str] = frozenset(), max_parallel: int = 200) -> Scheduler:
    dsn = DsnWriter(store=store, hostname="mx.example.com", redactor=Redactor(private))
    return Scheduler(store=store, table=config.routing_table(), agents={"smtp": smtp, "local": local},
                     retry=config.delivery.retry, max_parallel=max_parallel, dsn=dsn, keep_for=None,
                     clock=clock)


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
        store.fail_update, store.problem = OSError(28, "No space left on device"), "no space left in var"
        message = Message("Q1", "alice@sender.example", clock.now, "<m@x>", 10, "client [127.0.0.1]")
        made = await store.accept(message, b"Subject: hi\r\n\r\nbody\r\n", [NewCopy("ituki@example.com", HIDDEN, True)],
                                  [Event(clock.now, "Q1", None, "accepted", "", "")])
        scheduler.submit(made)
        await asyncio.sleep(0.5)  # many rechecks: the store still cannot write
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
