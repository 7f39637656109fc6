"""The measurements: one-at-a-time latencies, smtp-source throughput, and the deferred queue.

What it does: each function drives one running system (maildetour or the Postfix recipe, see
`System`) through the stand-in gmail (`Sink`) and its Maildirs (`Boxes`) and returns plain
numbers:
- `latencies`: n messages one at a time (the next is sent once every copy of the previous one
  arrived, after `gap` seconds of quiet); success path = 250 after DATA -> stand-in receipt,
  detour path = 250 -> file in the detour Maildir's new/. Milliseconds.
- `throughput`: `smtp-source` sends n messages of `size` bytes over `sessions` connections to
  the public address; accepted/s = n / time until smtp-source exits; delivered/s = n / time
  until the last copy arrived (PC Maildir, stand-in gmail or detour Maildir), plus CPU seconds
  the system used and, when the stand-in counts them, how many of the copies it accepted
  carried a DKIM-Signature (and how many such fields in all).
- `deferred_queue` (maildetour only): loads n messages while the stand-in answers 451 at RCPT,
  reads RSS, then flushes and measures the drain. See docs/benchmarks.md.

Contract: a phase returns only when every expected copy arrived; nothing is asserted about
speed. Exposure: bench-only. Failure: TimeoutError/RuntimeError naming the phase and what was
missing; smtp-source errors raise RuntimeError with its output.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.client import bench_message, send_one
from bench.observe import Boxes, Sink
from bench.proc import die_with_parent

PUBLIC = "ituki@example.com"
PC = "ituki@pc.example.net"
DETOUR = "ituki@gm.example.net"
ARRIVAL_TIMEOUT = 30.0  # one message, one copy: far beyond any sane latency


class System(Protocol):
    name: str

    @property
    def smtp_port(self) -> int: ...
    def maildir(self, address: str) -> Path: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def cpu_seconds(self) -> float: ...
    def logs(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Throughput:
    messages: int
    refused_share: float
    accepted_per_s: float
    delivered_per_s: float
    cpu_seconds: float
    seconds_to_accept: float
    seconds_to_deliver: float
    gmail_copies: int  # copies the stand-in accepted
    signed_copies: int  # of those, the ones with a DKIM-Signature (0 unless the sink counts)
    signatures: int  # DKIM-Signature fields on them in all


async def latencies(system: System, sink: Sink, boxes: Boxes, *, n: int, detour: bool,
                    tag: str, gap: float = 0.0, box: str = "detour") -> list[float]:
    """`box`: where a detoured copy is awaited ("detour" Maildir, or "imap" for the IMAP step)."""
    found: list[float] = []
    for i in range(n):
        if gap:
            await asyncio.sleep(gap)
        seq = f"{tag}-{i}"
        target = boxes.expect(box, seq) if detour else sink.expect(seq, "A")
        pc = boxes.expect("pc", seq)
        accepted = await send_one(system.smtp_port, bench_message(seq, refuse=detour))
        try:
            arrived = await asyncio.wait_for(target, ARRIVAL_TIMEOUT)
            await asyncio.wait_for(pc, ARRIVAL_TIMEOUT)
        except TimeoutError:
            where = f"{box} Maildir" if detour else "stand-in gmail"
            raise TimeoutError(f"{system.name}: message {seq} did not reach the {where} and the PC "
                               f"Maildir within {ARRIVAL_TIMEOUT}s\n{system.logs()}") from None
        found.append((arrived - accepted) / 1e6)
    return found


async def smtp_source(port: int, *, messages: int, sessions: int, size: int,
                      rcpt: str = PUBLIC) -> None:
    """Run Postfix's smtp-source against 127.0.0.1:port; raise unless every message was sent."""
    program = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    proc = await asyncio.create_subprocess_exec(
        program, "-4", "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
        "-f", "alice@sender.example", "-t", rcpt, "-M", "client.bench.test", "-S", "bench load",
        f"127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        preexec_fn=die_with_parent)
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source exited with {proc.returncode}: {out.decode(errors='replace')[-2000:]}")


async def throughput(system: System, sink: Sink, boxes: Boxes, *, n: int, sessions: int,
                     size: int, share: float, timeout: float) -> Throughput:
    await sink.command(f"share {share}")
    sink.reset()
    boxes.reset()
    cpu0 = system.cpu_seconds()
    start = time.monotonic_ns()
    await smtp_source(system.smtp_port, messages=n, sessions=sessions, size=size)
    accepted = time.monotonic_ns()

    def done() -> bool:
        return boxes.counts["pc"] >= n and sink.counts["A"] + boxes.counts["detour"] >= n

    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{system.name}: throughput run incomplete after {timeout}s: pc={boxes.counts['pc']} "
                f"gmail={sink.counts['A']} refused={sink.counts['R']} detour={boxes.counts['detour']} "
                f"of {n}\n{system.logs()}")
        await asyncio.sleep(0.05)
    if boxes.overflowed:
        raise RuntimeError("inotify overflowed during the throughput run")
    last = max(boxes.last_ns, sink.last_ns)
    cpu = system.cpu_seconds() - cpu0
    return Throughput(n, share, n / ((accepted - start) / 1e9), n / ((last - start) / 1e9), cpu,
                      (accepted - start) / 1e9, (last - start) / 1e9,
                      sink.counts["A"], sink.signed["A"], sink.signature_fields)


async def warm_up(system: System, sink: Sink, boxes: Boxes, tag: str, box: str = "detour") -> None:
    """A few messages on both paths, not measured: first connections, caches, process starts."""
    await latencies(system, sink, boxes, n=3, detour=False, tag=f"{tag}-warm-s")
    await latencies(system, sink, boxes, n=2, detour=True, tag=f"{tag}-warm-d", box=box)


async def idle_latencies(system: System, sink: Sink, boxes: Boxes, *, n: int, gap: float,
                         tag: str) -> tuple[list[float], list[float]]:
    """Success and detour messages alternately, each after `gap` seconds of quiet."""
    success: list[float] = []
    detour: list[float] = []
    for i in range(n):
        success += await latencies(system, sink, boxes, n=1, detour=False, tag=f"{tag}-s{i}", gap=gap)
        detour += await latencies(system, sink, boxes, n=1, detour=True, tag=f"{tag}-d{i}", gap=gap)
    return success, detour
