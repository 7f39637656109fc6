"""Issue 14, several nodes on one PostgreSQL store (a real PostgreSQL from Debian's package on
loopback): claims with FOR UPDATE SKIP LOCKED and leases, a dead node's copies taken over
after its lease (a node killed with SIGKILL in another process), LISTEN/NOTIFY waking the
others, an attempt's update refused once another node took the copy (its events still written
once), and the database stopped under a node: StoreUnavailable (the 451 of inbound), then the
node carries on by itself when the database is back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from maildetour.store.records import Event, Message, NewCopy
from tests.peers.postgres import PostgresPeer, running_postgres

if TYPE_CHECKING:
    from maildetour.store.postgres import PostgresStore  # (psycopg: imported once the peer runs)

LEASE = 3.0  # the shortest `[store] lease` the config allows


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresPeer]:
    with running_postgres() as peer:
        yield peer


def node(url: str, name: str | None, tmp_path: Path) -> PostgresStore:
    from maildetour.store.postgres import PostgresStore

    return PostgresStore(url, tmp_path / f"audit-{name}.jsonl", node=name, lease=LEASE, connections=4)


def msg(queue_id: str, at: float = 100.0) -> Message:
    return Message(queue_id, "a@b.example", at, f"<{queue_id}@x>", 5, "c [127.0.0.1]")


def one() -> list[NewCopy]:
    return [NewCopy("r@ex.com", "t@ex.org", False)]


def test_a_copy_is_claimed_by_one_node_only_and_the_accepting_node_keeps_its_own(postgres: PostgresPeer,
                                                                                 tmp_path: Path) -> None:
    url = postgres.new_database()

    async def main() -> tuple[int, int, int, list[int], list[int], int]:
        a, b, operator = node(url, "a", tmp_path), node(url, "b", tmp_path), node(url, None, tmp_path)
        async with a.running(), b.running(), operator.running():
            [mine] = await a.accept(msg("QA"), b"x\r\n", one(), [])
            seen_by_b = len((await b.due(1e12, 100)).copies)
            refused = len(await b.claim([mine], 200.0))
            kept = len(await a.claim([mine], 200.0))
            # Copies nobody leases (an operator's requeue, a dead node's): both nodes claim the
            # same 60 at once; each is granted to exactly one of them.
            free = []
            for i in range(60):
                free += await operator.accept(msg(f"QF{i}"), b"x\r\n", one(), [])
            got_a, got_b = await asyncio.gather(a.claim(free, 300.0), b.claim(free, 300.0))
            [moved] = await operator.accept(msg("QM"), b"x\r\n", one(), [])
            stale = len(await a.claim([replace(moved, attempts=7)], 300.0))  # another node moved it on
            return seen_by_b, refused, kept, [c.id for c in got_a], [c.id for c in got_b], stale

    seen_by_b, refused, kept, got_a, got_b, stale = asyncio.run(main())
    assert (seen_by_b, refused, kept) == (0, 0, 1)
    assert not set(got_a) & set(got_b) and len(got_a) + len(got_b) == 60
    assert stale == 0


_DYING_NODE = textwrap.dedent("""
    import asyncio, sys
    from maildetour.store.postgres import PostgresStore
    from maildetour.store.records import Message, NewCopy

    async def main():
        store = PostgresStore(sys.argv[1], None, node="dying", lease=float(sys.argv[2]), connections=2)
        async with store.running():
            await store.accept(Message("QDEAD", "a@b.example", 100.0, "<QDEAD@x>", 5, "c"), b"x\\r\\n",
                               [NewCopy("r@ex.com", "t@ex.org", False)], [])
            print("accepted", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
""")


def test_a_killed_nodes_copies_go_to_the_others_after_its_lease_and_they_are_woken(postgres: PostgresPeer,
                                                                                     tmp_path: Path) -> None:
    url = postgres.new_database()
    dying = subprocess.Popen([sys.executable, "-c", _DYING_NODE, url, str(LEASE)], stdout=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        assert dying.stdout is not None and dying.stdout.readline().strip() == b"accepted"

        async def main() -> tuple[int, float, int]:
            b = node(url, "b", tmp_path)
            woken = asyncio.Event()
            async with b.running():
                listening = asyncio.create_task(b.listen(woken.set, woken.set))
                await asyncio.sleep(0.5)  # LISTEN is in place
                assert await b.unfinished() == []  # (leased by a live node: not offered)
                [stored] = (await b.copies(None, 10))
                before = len(await b.claim([stored], 200.0))
                os.kill(dying.pid, signal.SIGKILL)
                killed = time.monotonic()
                await asyncio.wait_for(woken.wait(), LEASE * 4)  # no polling: a NOTIFY woke it
                waited = time.monotonic() - killed
                taken = len(await b.claim([stored], 300.0))
                listening.cancel()
                return before, waited, taken

        before, waited, taken = asyncio.run(main())
        assert before == 0 and taken == 1
        assert waited <= LEASE * 2  # the lease, plus at most one heartbeat of the survivor
    finally:
        if dying.poll() is None:
            dying.kill()
        dying.wait()


def test_an_update_after_another_node_took_the_copy_is_refused_and_recorded_once(postgres: PostgresPeer,
                                                                                  tmp_path: Path) -> None:
    url = postgres.new_database()
    database = url.rsplit("/", 1)[1]

    async def main() -> tuple[bool, bool, list[str], str]:
        a, b = node(url, "a", tmp_path), node(url, "b", tmp_path)
        async with a.running(), b.running():
            [copy] = await a.accept(msg("QT"), b"x\r\n", one(), [])
            postgres.psql("UPDATE copies SET lease_until = 0", database)  # a's lease ran out (a stalled node)
            [taken] = await b.claim([copy], 200.0)
            late = await a.update(replace(copy, state="delivered", attempts=1),
                                  [Event(201.0, "QT", copy.id, "delivered", copy.target, "a: 250")])
            own = await b.update(replace(taken, state="delivered", attempts=1),
                                 [Event(202.0, "QT", copy.id, "delivered", copy.target, "b: 250")])
            story = await b.story("QT")
            assert story is not None
            return late, own, [e.detail for e in story.events], story.copies[0].state

    late, own, details, state = asyncio.run(main())
    assert (late, own, state) == (False, True, "delivered")
    assert details == ["a: 250", "b: 250"]  # each attempt recorded once: the crash window, visible


def test_the_database_stopped_is_a_store_error_and_the_node_recovers_by_itself(tmp_path: Path) -> None:
    with running_postgres() as peer:
        from maildetour.store.postgres import StoreUnavailable

        url = peer.url()

        async def main() -> tuple[str | None, str | None, int, str | None]:
            store = node(url, "a", tmp_path)
            async with store.running():
                await store.accept(msg("Q1"), b"x\r\n", one(), [])
                ready = store.health()
                await asyncio.to_thread(peer.stop, "immediate")
                with pytest.raises(StoreUnavailable):
                    await store.accept(msg("Q2"), b"x\r\n", one(), [])
                down = store.health()
                await asyncio.to_thread(peer.start)
                deadline = time.monotonic() + 30
                while True:  # what the inbound side does: each DATA tries again
                    try:
                        await store.accept(msg("Q3"), b"x\r\n", one(), [])
                        break
                    except StoreUnavailable:
                        assert time.monotonic() < deadline, "the store did not come back"
                        await asyncio.sleep(0.2)
                return ready, down, len(await store.unfinished()), store.health()

        ready, down, queued, again = asyncio.run(main())
        assert ready is None and down is not None and again is None
        assert queued == 2  # Q1 and Q3; Q2 was never acknowledged and is not there
