"""The deferred-queue run (maildetour only): RSS with n messages deferred, and the drain time.

What it does: starts maildetour with retries pushed out (retry_first = retry_max = 1h,
detour_after = 7d) while the stand-in gmail answers `451 4.7.0` at RCPT; loads n messages of
`size` bytes with several `smtp-source` processes in parallel; waits until every gmail copy had
its one failed attempt and every PC copy is in its Maildir; reads RSS (now, and the peak since
start). Then it stops maildetour, makes every queued copy due (`MaildetourSystem.flush`, a
stand-in for a queue-flush command), lets the stand-in accept, restarts maildetour and times
how long until the stand-in received all n gmail copies (start-up and the reload of the queue
included), sampling RSS meanwhile.

Contract: returns a `MemoryResult`; never asserts speed. Exposure: bench-only. Failure:
TimeoutError naming the stage and the counts reached.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.maildetour_system import MaildetourSystem
from bench.observe import Sink
from bench.proc import free_port
from bench.scenarios import PC, smtp_source

LOADERS = 4  # smtp-source processes in parallel
SESSIONS_PER_LOADER = 10  # 40 sessions in all, below maildetour's max_sessions (100)


@dataclass(frozen=True, slots=True)
class MemoryResult:
    messages: int
    size: int
    load_seconds: float  # smtp-source start until every copy was accepted and attempted once
    rss_deferred_mb: float  # RSS once all n gmail copies are deferred and the load is over
    peak_rss_load_mb: float  # VmHWM of the process that took the load
    restart_seconds: float  # start of the new process until it listens
    drain_seconds: float  # start of the new process until the stand-in got the last copy
    drain_per_s: float
    peak_rss_drain_mb: float  # VmHWM of the process that drained the queue


def _count_files(directory: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(directory))
    except FileNotFoundError:
        return 0


async def _wait(what: str, ready: Callable[[], bool], timeout: float, detail: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"memory run: {what} not done after {timeout}s ({detail()})")
        await asyncio.sleep(0.5)


async def deferred_queue(workdir: Path, *, n: int, size: int, timeout: float,
                         src: Path | None = None) -> MemoryResult:
    sink = Sink()
    await sink.start()
    system = MaildetourSystem(workdir, free_port(), free_port(), (sink.host, sink.port),
                              delivery_extra='retry_first = "1h"\nretry_max = "1h"', detour_after="7d", src=src)
    try:
        await sink.command("tempfail 1")
        await asyncio.to_thread(system.start)
        start = time.monotonic()
        per = n // LOADERS
        counts = [per] * (LOADERS - 1) + [n - per * (LOADERS - 1)]
        await asyncio.gather(*(smtp_source(system.smtp_port, messages=c, sessions=SESSIONS_PER_LOADER,
                                           size=size) for c in counts))
        pc_new = system.maildir(PC) / "new"
        await _wait("deferring", lambda: sink.counts["T"] >= n and _count_files(pc_new) >= n, timeout,
                    lambda: f"attempted {sink.counts['T']}, PC copies {_count_files(pc_new)} of {n}")
        load_seconds = time.monotonic() - start
        await asyncio.sleep(1.0)  # let the last writes settle before reading RSS
        rss, hwm = system.memory_kb()
        await asyncio.to_thread(system.stop)
        flushed = await asyncio.to_thread(system.flush)
        if flushed < n:
            raise RuntimeError(f"memory run: only {flushed} queued copies to flush, expected {n}")
        await sink.command("tempfail 0")
        sink.reset()
        start_ns = time.monotonic_ns()
        await asyncio.to_thread(system.start)
        restart = (time.monotonic_ns() - start_ns) / 1e9
        peak = 0

        def sample() -> bool:
            nonlocal peak
            if system.proc is not None and system.proc.poll() is None:
                peak = max(peak, system.memory_kb()[1])
            return sink.counts["A"] >= n

        await _wait("draining", sample, timeout, lambda: f"delivered {sink.counts['A']} of {n}")
        drain = (sink.last_ns - start_ns) / 1e9
        peak = max(peak, system.memory_kb()[1])
        return MemoryResult(n, size, load_seconds, rss / 1024, hwm / 1024, restart, drain, n / drain,
                            peak / 1024)
    finally:
        await asyncio.to_thread(system.stop)
        await sink.stop()
