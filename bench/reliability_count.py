"""Counting what became of every message: the ledger of what clients sent, and the tally of
where each acknowledged message's copies arrived.

What it does: `Ledger.send` sends one message (`send_from`) and files its seq as acknowledged
(its 250 was read) or not, with where its hidden copy belongs. `where` compares the ledger with
what the PC Maildir, the stand-in gmail and the detour Maildir received (seq -> count): exactly
once where it belongs, lost, duplicated, in the wrong place. `wait_delivered` waits until every
acknowledged message has arrived; `final_count` counts from the Maildirs' files and the
stand-in's receipts (not from inotify) and adds what the system says (queue left, errors).

Contract: `where` is pure. Exposure: bench-only. Failure: none of its own; counts are reported.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from bench.client import bench_message
from bench.reliability_clients import Sent, send_from
from bench.reliability_systems import SeqBoxes, TallySink, maildir_seqs
from bench.scenarios import DETOUR, PC


class Ledger:
    """What clients sent: acknowledged messages and the rest (by how they ended), each seq with
    where its hidden copy belongs: True the detour Maildir (the stand-in refuses it), False the
    stand-in, None either (`either`: when the stand-in is away, the copy's detour is right)."""

    def __init__(self, *, either: bool = False) -> None:
        self.either = either
        self.acked: dict[str, bool | None] = {}
        self.unacked: dict[str, bool | None] = {}
        self.replies: Counter[str] = Counter()

    async def send(self, port: int, seq: str, *, refuse: bool = False, size: int = 1024,
                   stage: Any = None, pace: tuple[int, float] | None = None) -> Sent:
        sent = await send_from(port, bench_message(seq, refuse=refuse, body_bytes=size),
                               stage=stage, timeout=60, pace=pace)
        (self.acked if sent.accepted else self.unacked)[seq] = None if self.either else refuse
        self.replies[f"{sent.code} at {sent.stage}" if sent.code else f"no reply ({sent.stage})"] += 1
        return sent


def where(ledger: Ledger, pc: Counter[str], gmail: Counter[str], detour: Counter[str]) -> dict[str, Any]:
    """Every acknowledged message against what the PC Maildir, the stand-in and the detour
    Maildir received: its target is the stand-in, or the detour Maildir when it was refused."""
    exact = lost = duplicated = wrong = dup_pc = dup_hidden = 0
    extra_copies = 0
    lost_seqs: list[str] = []
    for seq, refused in ledger.acked.items():
        hidden = gmail[seq] + detour[seq]
        at_target = hidden if refused is None else detour[seq] if refused else gmail[seq]
        elsewhere = 0 if refused is None else gmail[seq] if refused else detour[seq]
        if pc[seq] == 0 or hidden == 0:
            lost += 1
            lost_seqs.append(seq)
        dup_pc += pc[seq] > 1
        dup_hidden += hidden > 1
        if pc[seq] > 1 or hidden > 1:
            duplicated += 1
            extra_copies += max(0, pc[seq] - 1) + max(0, hidden - 1)
        if elsewhere:
            wrong += 1
        if pc[seq] == 1 and at_target == 1 and not elsewhere:
            exact += 1
    unacked_delivered = sum(1 for seq in ledger.unacked if pc[seq] or gmail[seq] or detour[seq])
    return {"acknowledged": len(ledger.acked), "exactly_once": exact, "lost": lost,
            "lost_examples": lost_seqs[:10], "duplicated": duplicated, "extra_copies": extra_copies,
            "duplicated_pc_copy": dup_pc, "duplicated_hidden_copy": dup_hidden,
            "hidden_copy_elsewhere": wrong, "not_acknowledged": len(ledger.unacked),
            "not_acknowledged_but_delivered": unacked_delivered}


def delivered(ledger: Ledger, boxes: SeqBoxes, sink: TallySink) -> bool:
    pc, detour, gmail = boxes.seqs["pc"], boxes.seqs["detour"], sink.seqs["A"]
    return all(pc[s] and (gmail[s] + detour[s] if r is None else detour[s] if r else gmail[s])
               for s, r in ledger.acked.items())


async def wait_delivered(ledger: Ledger, boxes: SeqBoxes, sink: TallySink, timeout: float) -> float | None:
    """Seconds until every acknowledged message was delivered (None: not within `timeout`)."""
    start = time.monotonic()
    while not delivered(ledger, boxes, sink):
        if time.monotonic() - start > timeout:
            return None
        await asyncio.sleep(0.1)
    return time.monotonic() - start


def final_count(system: Any, ledger: Ledger, sink: TallySink) -> dict[str, Any]:
    """From the Maildirs' files and the stand-in's log of receipts (not from inotify), and
    what the system itself says: its queue, its errors."""
    return where(ledger, maildir_seqs(system.maildir(PC)), sink.seqs["A"], maildir_seqs(system.maildir(DETOUR))) | {
        "queue_left": system.queue_left(), "tracebacks": system.tracebacks(), "errors": system.errors()[:8]}


def attempts(system: Any, target: str) -> dict[str, Any]:
    """Attempts per copy at `target` (maildetour: the queue's events; Postfix: its log)."""
    counts = sorted(system.attempts(target))
    if not counts:
        return {"copies": 0, "attempts": 0, "max_per_copy": 0}
    return {"copies": len(counts), "attempts": sum(counts), "max_per_copy": counts[-1],
            "per_copy": dict(sorted(Counter(counts).items()))}
