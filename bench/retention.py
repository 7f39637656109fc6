"""`python3 -m bench.retention [--messages N] [...]`: does the store stay bounded under a steady
load with retention on? (issue 12: "size after 1 million messages with a short retention")

What it does: drives N messages through `SqliteStore` directly — the `Store` interface the
server uses, not SMTP: no sockets, no agents, so the figure is the store's alone — on a clock
of its own (simulated time: `--rate` messages per simulated second, however fast the machine
is). Each message is what the seed's setup makes of one mail: accepted with two copies (the PC
mailbox and the hidden gmail address) and its "accepted" event, both copies delivered (one
event each), finished with its bytes kept for `--late-bounce-window` (SRS is on by default);
one message in 1,000 has its hidden copy quarantined instead. `store.retention.Sweeper` sweeps
every `--sweep-interval` simulated seconds, concurrently with the load (as in the server), with
`--retention` and `--quarantine-retention`, after the purge of bytes past their late-bounce
window (`store.purge`, the server's hourly `LateBounces.run`). `--concurrency` messages are in flight at once (the
writer groups their commits, as it does for concurrent SMTP sessions). Samples: the database
file (+ WAL), the spool (files and bytes), rows per table, and the wall-clock latency of
`accept` (p50, p99, max: a sweep that held the writer long would show there). The audit log
goes to /dev/null: it is logrotate's, not the store's (docs/operations.md).

Output: a table on stdout; with `--out DIR`, retention.json (every sample and the plan).
Exposure: bench-only; writes only under its working directory (a temporary one unless
`--dir`). Exit codes: 0 done, 2 usage. Never asserts a size: it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from maildetour.store.records import Event, Message, NewCopy
from maildetour.store.retention import RetentionRules, Sweeper
from maildetour.store.sqlite import SqliteStore

BODY = b"".join(b"Line %d of a small message, as mail of a few KB is.\r\n" % i for i in range(60))
START = 1_800_000_000.0  # the simulated clock's epoch (2027-01-15)


@dataclass(frozen=True, slots=True)
class Plan:
    messages: int = 1_000_000
    rate: float = 100.0  # messages per simulated second
    retention: float = 60.0  # simulated seconds
    quarantine_retention: float = 120.0
    late_bounce_window: float = 30.0
    sweep_interval: float = 10.0
    batch: int = 500
    concurrency: int = 100
    samples: int = 40


@dataclass(frozen=True, slots=True)
class Sample:
    messages: int  # accepted so far
    wall: float  # seconds since the start
    simulated: float  # simulated seconds since the start
    db_bytes: int  # queue.sqlite3 + its WAL
    spool_files: int
    spool_bytes: int
    rows_messages: int
    rows_copies: int
    rows_events: int
    accept_p50_ms: float  # since the previous sample
    accept_p99_ms: float
    accept_max_ms: float
    purged: int  # messages removed by the sweep so far
    expired: int  # quarantined copies deleted so far


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


async def drive(plan: Plan, directory: Path) -> list[Sample]:
    clock = Clock()
    store = SqliteStore(directory / "queue.sqlite3", directory / "spool", Path(os.devnull))
    rules = RetentionRules(plan.retention, plan.quarantine_retention, plan.sweep_interval, plan.batch)
    sweeper = Sweeper(store, rules, clock)
    samples: list[Sample] = []
    latencies: list[float] = []
    totals = {"purged": 0, "expired": 0}
    started = time.monotonic()
    every = max(plan.messages // plan.samples, plan.concurrency)
    next_sweep = START + plan.sweep_interval
    sweeping: asyncio.Task[None] | None = None

    async def one(number: int) -> None:
        now = clock()
        queue_id = f"{int(now * 1_000_000):013X}{number % 65536:04X}"
        message = Message(queue_id, "alice@sender.example", now, f"<{number}@sender.example>", len(BODY),
                          "client.test [127.0.0.1]")
        began = time.monotonic()
        made = await store.accept(message, BODY, [NewCopy("ituki@example.com", "ituki@pc.example.net", False),
                                                  NewCopy("ituki@example.com", "ituki-ex@gmail.com", True)],
                                  [Event(now, queue_id, None, "accepted", "ituki@example.com", "from=<alice>")])
        latencies.append(time.monotonic() - began)
        for copy in made:
            state = "quarantined" if copy.hidden and number % 1000 == 999 else "delivered"
            await store.update(replace(copy, state=state, attempts=1),  # type: ignore[arg-type]
                               [Event(now, queue_id, copy.id, state, copy.target, "250 2.0.0 OK")])  # type: ignore[arg-type]
        await store.finish(queue_id, now + plan.late_bounce_window)

    async def sweep() -> None:
        await store.purge(clock())  # what LateBounces.run does in the server: bytes past keep_until
        swept = await sweeper.sweep()
        totals["purged"] += swept.purged
        totals["expired"] += swept.expired

    async with store.running():
        done = 0
        while done < plan.messages:
            count = min(plan.concurrency, plan.messages - done)
            await asyncio.gather(*(one(done + i) for i in range(count)))
            done += count
            clock.now += count / plan.rate
            if clock.now >= next_sweep and (sweeping is None or sweeping.done()):
                sweeping = asyncio.create_task(sweep())
                next_sweep = clock.now + plan.sweep_interval
            if done % every < count or done == plan.messages:
                samples.append(_sample(directory, done, time.monotonic() - started, clock.now - START,
                                       latencies, totals))
                latencies.clear()
                print(_row(samples[-1]), flush=True)
        if sweeping is not None:
            await sweeping
    store.close()
    return samples


def _sample(directory: Path, done: int, wall: float, simulated: float, latencies: list[float],
            totals: dict[str, int]) -> Sample:
    db = directory / "queue.sqlite3"
    db_bytes = sum(p.stat().st_size for p in (db, db.with_name("queue.sqlite3-wal")) if p.exists())
    files, spool_bytes = 0, 0
    for entry in os.scandir(directory / "spool"):
        try:  # the sweep runs meanwhile: a file listed may be gone
            spool_bytes += entry.stat().st_size if entry.is_file() else 0
            files += entry.is_file()
        except FileNotFoundError:
            pass
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("messages", "copies", "events")]
    finally:
        conn.close()
    ms = sorted(x * 1000 for x in latencies) or [0.0]
    p99 = ms[max(int(len(ms) * 0.99) - 1, 0)]
    return Sample(done, round(wall, 1), round(simulated, 1), db_bytes, files, spool_bytes, *rows,
                  round(statistics.median(ms), 2), round(p99, 2),
                  round(ms[-1], 2), totals["purged"], totals["expired"])


HEADER = ("messages  wall_s  sim_s   db_MB  spool_files  spool_MB  rows(msg/copies/events)  "
          "accept_ms p50/p99/max  purged  expired")


def _row(s: Sample) -> str:
    return (f"{s.messages:>8}  {s.wall:>6.0f}  {s.simulated:>5.0f}  {s.db_bytes / 2**20:>6.1f}  {s.spool_files:>11}"
            f"  {s.spool_bytes / 2**20:>8.1f}  {s.rows_messages:>7}/{s.rows_copies}/{s.rows_events:<8}"
            f"  {s.accept_p50_ms:>6.1f}/{s.accept_p99_ms:.1f}/{s.accept_max_ms:.1f}  {s.purged:>7}  {s.expired:>6}")


def main(argv: list[str] | None = None) -> int:
    d = Plan()
    parser = argparse.ArgumentParser(prog="python3 -m bench.retention", description=(
        "Drive messages through the store (not SMTP) on a simulated clock with retention on; "
        "print the database and spool size as it goes."))
    parser.add_argument("--messages", type=int, default=d.messages)
    parser.add_argument("--rate", type=float, default=d.rate, help="messages per simulated second")
    parser.add_argument("--retention", type=float, default=d.retention, help="simulated seconds")
    parser.add_argument("--quarantine-retention", type=float, default=d.quarantine_retention)
    parser.add_argument("--late-bounce-window", type=float, default=d.late_bounce_window)
    parser.add_argument("--sweep-interval", type=float, default=d.sweep_interval)
    parser.add_argument("--batch", type=int, default=d.batch, help="rows per purge transaction")
    parser.add_argument("--concurrency", type=int, default=d.concurrency)
    parser.add_argument("--samples", type=int, default=d.samples)
    parser.add_argument("--dir", type=Path, help="work here (kept) instead of a temporary directory")
    parser.add_argument("--out", type=Path, help="write retention.json here")
    args = parser.parse_args(argv)
    plan = Plan(args.messages, args.rate, args.retention, args.quarantine_retention, args.late_bounce_window,
                args.sweep_interval, args.batch, args.concurrency, args.samples)
    if min(plan.messages, plan.concurrency, plan.batch, plan.samples) < 1 or plan.rate <= 0:
        parser.error("counts and the rate must be positive")
    directory = args.dir or Path(tempfile.mkdtemp(prefix="maildetour-retention-"))
    print(f"store in {directory}; {asdict(plan)}\n{HEADER}", flush=True)
    try:
        samples = asyncio.run(drive(plan, directory))
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "retention.json").write_text(json.dumps(
            {"plan": asdict(plan), "samples": [asdict(s) for s in samples]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
