"""Memory is bounded by bytes: peak memory with many big messages at once, and with a backlog
of big messages to a host that defers them.

What it does:
- `receive(kind, ...)`: `n` clients (from 127.0.0.1) send one message each of `size` octets
  at the same time, the largest that fits under `max_message_size` with its headers, with
  998-octet lines (the RFC 5322 limit; shorter lines cost more per octet, see `line_cost`).
  maildetour: the peak RSS of the server process (VmHWM, the kernel's own peak), from start
  until every copy arrived (PC Maildir and stand-in gmail). Postfix recipe (its message size
  limit raised to fit): the peak of the summed PSS of all its processes, sampled, over the same
  span (PSS, so the shared libraries of a hundred smtpd processes count once).
- `backlog(...)` (maildetour): the stand-in answers 451 while `n` big messages arrive (four
  clients at a time); the RSS once every gmail copy is deferred, and the load's peak. Then the
  server is stopped, every copy made due (as `queue --flush` does with no server running),
  the stand-in accepts, the server starts again and drains the backlog: that process's peak
  is the figure for attempts in flight (`max_bytes_in_flight`, per-host connections).
- `line_cost(...)`: one message of the same size with 78-octet lines (base64 attachments),
  against one with 998-octet lines, each alone: the extra peak per message that short lines
  cost while DATA is being read (aiosmtpd keeps one object per line).

Contract: loopback only; samples /proc; every process stopped before returning. A safety cap
(`cap_mb`) kills a system whose memory passes it and reports that, so the shared machine never
swaps. Exposure: bench-only. Failure: TimeoutError naming the stage when copies do not arrive.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.client import bench_message
from bench.observe import Boxes, Sink
from bench.proc import free_port, memory_kb
from bench.reliability_clients import send_from
from bench.reliability_peers import MemorySampler
from bench.reliability_systems import EditedMaildetour, GuardedPostfix, fresh
from bench.scenarios import DETOUR, PC

MB = 1024 * 1024
MAX_MESSAGE = 25 * MB  # maildetour's max_message_size default (and the seed's "25MB")
HEADROOM = 8192  # our Received header and the bench headers fit in this
# Postfix's message_size_limit bounds its queue file (envelope records and its own headers
# included): 26 MiB lets the same messages in.
POSTFIX_LIMIT = 26 * MB


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    concurrent: int = 100
    backlog: int = 40
    backlog_clients: int = 4
    cap_mb: int = 12_000  # stop a system above this (the machine is shared)
    postfix: bool = True
    src: str | None = None  # run the maildetour package in this directory


def _src(plan: MemoryPlan) -> Path | None:
    return Path(plan.src) if plan.src else None


def big_body(size: int, line: int = 998) -> bytes:
    """`size` octets of `line`-octet lines (CRLF included), none starting with a dot."""
    one = b"Y" * (line - 2) + b"\r\n"
    return (one * (size // len(one) + 1))[:size - 2] + b"\r\n"


def message_parts(seq: str, body: bytes) -> tuple[bytes, bytes]:
    head = bench_message(seq, body_bytes=0)  # headers and an empty body line
    return head, body


async def _watch(sampler: MemorySampler, done: Any, timeout: float, cap_mb: int, what: str) -> bool:
    """Wait for `done()`; False when the cap was passed (the caller kills the system)."""
    deadline = time.monotonic() + timeout
    while not done():
        if sampler.peak_kb / 1024 > cap_mb:
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(f"memory run: {what} not done after {timeout:.0f}s")
        await asyncio.sleep(0.2)
    return True


async def receive(kind: str, work: Path, plan: MemoryPlan, log: Any) -> dict[str, Any]:
    n = plan.concurrent
    size = MAX_MESSAGE - HEADROOM
    body = big_body(size)
    sink = Sink()
    await sink.start()
    workdir = fresh(work / f"memory-{kind}")
    if kind == "maildetour":
        system: Any = EditedMaildetour(workdir, free_port(), free_port(), (sink.host, sink.port), src=_src(plan))
    else:
        system = GuardedPostfix(workdir, free_port(), free_port(), (sink.host, sink.port),
                                main_extra={"message_size_limit": str(POSTFIX_LIMIT), "virtual_mailbox_limit": "0",
                                            "mailbox_size_limit": "0"})
    try:
        await asyncio.to_thread(system.start)
        boxes = Boxes(system.maildir(PC), system.maildir(DETOUR))
        await asyncio.sleep(1.0)
        if kind == "maildetour":
            sampler = MemorySampler(pid=system.pid, every=0.1)
        else:
            sampler = MemorySampler(pids=system.pids, every=0.25)
        idle_kb = sampler.sample()
        sampler.peak_kb = 0
        start = time.monotonic()
        start_ns = time.monotonic_ns()
        with sampler:
            sending = [asyncio.ensure_future(send_from(system.smtp_port, message_parts(f"big-{i}", body),
                                                       timeout=600)) for i in range(n)]
            done_sending = asyncio.ensure_future(asyncio.gather(*sending))

            def delivered() -> bool:
                if not done_sending.done():
                    return False
                accepted = sum(1 for s in done_sending.result() if s.accepted)
                return boxes.counts["pc"] >= accepted and sink.counts["A"] >= accepted

            within = await _watch(sampler, delivered, 900, plan.cap_mb, f"{kind}: {n} big messages")
            if not within:
                system.stop()
                done_sending.cancel()
            sent = await done_sending if within else []
        accepted = sum(1 for s in sent if s.accepted)
        last_ack = max((s.replied_ns for s in sent if s.accepted), default=None)
        peak_kb = sampler.hwm_kb() if kind == "maildetour" else sampler.peak_kb
        boxes.close()
        return {"system": kind, "messages": n, "size": size + len(message_parts("x", b"")[0]),
                "accepted": accepted, "refused": [s.text for s in sent if not s.accepted][:5],
                "capped": not within, "idle_mb": round(idle_kb / 1024, 1),
                "peak_mb": round(peak_kb / 1024, 1), "measure": "VmHWM" if kind == "maildetour" else "PSS sum, sampled",
                "accept_seconds": None if last_ack is None else round((last_ack - start_ns) / 1e9, 1),
                "seconds_to_delivered": round(time.monotonic() - start, 1)}
    finally:
        await asyncio.to_thread(system.stop)
        await sink.stop()


async def backlog(work: Path, plan: MemoryPlan, log: Any) -> dict[str, Any]:
    n = plan.backlog
    size = MAX_MESSAGE - HEADROOM
    body = big_body(size)
    sink = Sink()
    await sink.start()
    system = EditedMaildetour(fresh(work / "memory-backlog"), free_port(), free_port(), (sink.host, sink.port),
                              delivery_extra='retry_first = "1h"\nretry_max = "1h"', detour_after="7d", src=_src(plan))
    try:
        await sink.command("tempfail 1")
        await asyncio.to_thread(system.start)
        boxes = Boxes(system.maildir(PC), system.maildir(DETOUR))
        idle_kb = memory_kb(system.pid)[0]
        gate = asyncio.Semaphore(plan.backlog_clients)

        async def one(i: int) -> bool:
            async with gate:
                return (await send_from(system.smtp_port, message_parts(f"backlog-{i}", body), timeout=600)).accepted

        start = time.monotonic()
        accepted = sum(await asyncio.gather(*(one(i) for i in range(n))))
        deadline = time.monotonic() + 300
        while sink.counts["T"] < accepted or boxes.counts["pc"] < accepted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"memory backlog: deferred {sink.counts['T']}, PC {boxes.counts['pc']} of {accepted}")
            await asyncio.sleep(0.2)
        load_seconds = time.monotonic() - start
        await asyncio.sleep(1.0)
        rss, hwm = system.memory_kb()
        boxes.close()
        await asyncio.to_thread(system.stop)
        flushed = await asyncio.to_thread(system.flush)
        await sink.command("tempfail 0")
        sink.reset()
        began = time.monotonic()
        await asyncio.to_thread(system.start)
        sampler = MemorySampler(pid=system.pid, every=0.1)
        with sampler:
            within = await _watch(sampler, lambda: sink.counts["A"] >= accepted, 600, plan.cap_mb, "backlog drain")
        drain_hwm = sampler.hwm_kb()
        return {"messages": n, "accepted": accepted, "size": size, "idle_mb": round(idle_kb / 1024, 1),
                "load_seconds": round(load_seconds, 1), "rss_deferred_mb": round(rss / 1024, 1),
                "peak_load_mb": round(hwm / 1024, 1), "flushed": flushed, "capped": not within,
                "drain_seconds": round(time.monotonic() - began, 1), "peak_drain_mb": round(drain_hwm / 1024, 1)}
    finally:
        await asyncio.to_thread(system.stop)
        await sink.stop()


async def line_cost(work: Path, plan: MemoryPlan, log: Any) -> dict[str, Any]:
    """Peak RSS above idle for one big message alone, with long and with short lines."""
    size = MAX_MESSAGE - HEADROOM
    found: dict[str, Any] = {}
    for line in (998, 78):
        body = big_body(size, line)
        sink = Sink()
        await sink.start()
        system = EditedMaildetour(fresh(work / f"memory-lines-{line}"), free_port(), free_port(),
                                  (sink.host, sink.port), src=_src(plan))
        try:
            await asyncio.to_thread(system.start)
            await asyncio.sleep(0.5)
            idle = memory_kb(system.pid)[0]
            began = time.monotonic()
            sent = await send_from(system.smtp_port, message_parts(f"lines-{line}", body), timeout=600)
            deadline = time.monotonic() + 120
            while sink.counts["A"] < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            found[f"lines_{line}"] = {"accepted": sent.accepted, "idle_mb": round(idle / 1024, 1),
                                      "peak_mb": round(memory_kb(system.pid)[1] / 1024, 1),
                                      "seconds": round(time.monotonic() - began, 1)}
        finally:
            await asyncio.to_thread(system.stop)
            await sink.stop()
    return found
