"""Faults survived: kill -9 under load, a full disk, a flapping downstream, a DNS outage.

What it does, each on the real `maildetour serve` with the seed config and the stand-in gmail:
- `kill_nine`: `senders` clients send messages one after another (sizes mixed, a share marked
  so the stand-in refuses them: their hidden copy takes the detour into the gm Maildir), while
  the server is killed with SIGKILL `kills` times, each after a random `min_up`..`max_up`
  seconds of running, and started again at once on the same state directory. At each kill it
  notes where the work stood (clients sending DATA, clients waiting for the 250 after the
  final dot, acknowledged messages not yet delivered, copies refused by the stand-in and not
  yet in the detour Maildir). Afterwards it waits until the queue is empty and counts, for
  every message that got a 250: its copies in the PC Maildir, at the stand-in and in the detour
  Maildir — exactly once each where it belongs, lost, duplicated, or in the wrong place.
- `disk_full`: the state directory on a small tmpfs (mounted here, unmounted after). Mail
  before; copies deferred at the stand-in; then the filesystem is filled: what clients hear,
  whether the server keeps serving, whether a detour into a Maildir on the full disk waits;
  then space returns: is everything acknowledged delivered, and how soon.
- `flapping`: a steady trickle of messages while the stand-in goes up, answers 451, up, is
  stopped (connections refused), up. Counts where every copy went and how many attempts each
  needed (from the queue's events).
- `dns_outage`: gmail.com reached by its MX through a dnsmasq (no relay); dnsmasq is stopped for
  `outage` seconds and started again. Where the gmail copies are during the outage, how many
  attempts they made, and how long after DNS returns they arrive.
Retry timing: the defaults (maildetour: first retry after 1 min; Postfix: 300 s) would make
these runs take many minutes; both systems run with retries after 3 s, at most every 10 s
(`retry_first`/`retry_max`; Postfix's `minimal_backoff_time`/`maximal_backoff_time`/
`queue_run_delay`), which changes when a copy is tried again, not whether. The Postfix recipe
runs kill -9, the full disk and the flapping too (`kind`); its DNS goes through the system's
resolver, which this run does not repoint, so the DNS outage is maildetour's alone.

Contract: loopback only; every process stopped, every mount undone, before returning.
Exposure: bench-only. Failure: a phase that cannot run raises RuntimeError; figures that are
wrong (a lost message) are reported, not raised.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.client import bench_message
from bench.proc import free_port
from bench.reliability_clients import send_from
from bench.reliability_count import Ledger, attempts, final_count, wait_delivered
from bench.reliability_peers import Dnsmasq, fill, tmpfs
from bench.reliability_systems import (
    EditedMaildetour,
    GuardedPostfix,
    SeqBoxes,
    TallySink,
    fresh,
)
from bench.scenarios import DETOUR, PC

GMAIL = "ituki-ex@gmail.com"
FAST_RETRY = 'retry_first = "3s"\nretry_max = "10s"'
# The same for the Postfix recipe: its deferred queue is tried after 3 s, then at most every
# 10 s (defaults: minimal_backoff_time 300 s, maximal_backoff_time 4000 s, queue_run_delay 300 s).
POSTFIX_FAST_RETRY = {"minimal_backoff_time": "3s", "maximal_backoff_time": "10s", "queue_run_delay": "3s"}


@dataclass(frozen=True, slots=True)
class FaultPlan:
    kills: int = 30
    senders: int = 8
    min_up: float = 0.3
    max_up: float = 3.0
    refuse_share: float = 0.2  # messages the stand-in refuses (their hidden copy detours)
    sizes: tuple[int, ...] = (1024, 8192, 65536, 262144)
    drain_timeout: float = 60.0
    full_seconds: float = 15.0  # the disk stays full this long
    flap_phase: float = 8.0  # seconds per phase of the flapping stand-in
    flap_rate: float = 4.0  # messages per second during the flapping
    outage: float = 20.0  # seconds without DNS
    seed: int = 10
    src: str | None = None  # run the maildetour package in this directory


def make(kind: str, workdir: Path, sink: TallySink, src: str | None) -> Any:
    """maildetour (the seed config) or the Postfix recipe, each with its retry timers short."""
    if kind == "maildetour":
        return EditedMaildetour(workdir, free_port(), free_port(), (sink.host, sink.port), delivery_extra=FAST_RETRY,
                                src=Path(src) if src else None)
    return GuardedPostfix(workdir, free_port(), free_port(), (sink.host, sink.port), both_extra=POSTFIX_FAST_RETRY)


# --- kill -9 -----------------------------------------------------------------------------------
# Where a kill is aimed, in turn: a random instant; while a slow client sends its body (mid-
# DATA); right after a client's final dot (mid-commit: the server is storing); the instant the
# stand-in has the end of a copy's DATA and has not answered yet (mid-delivery); a few ms after
# the stand-in refused a copy (mid-detour: the server is deciding and writing the detour).
TRIGGERS = ("random", "data", "dot", "delivery", "detour")
TRIGGER_WAIT = 5.0  # a trigger that does not come within this long: kill anyway ("timeout")
SLOW_PACE = (16384, 0.02)  # the slow client: 16 KB every 20 ms (~0.8 MB/s)


class Triggers:
    """Events the kill loop waits for, set from the clients' stage callbacks and the stand-in."""

    def __init__(self) -> None:
        self.events = {name: asyncio.Event() for name in TRIGGERS if name != "random"}

    def stage(self, name: str) -> None:
        if name in self.events:
            self.events[name].set()

    def stand_in(self, seq: str, verdict: str) -> None:
        if verdict == "A":
            self.events["delivery"].set()
        elif verdict == "R":
            self.events["detour"].set()

    async def wait(self, name: str, rng: random.Random) -> str:
        if name == "random":
            return name
        event = self.events[name]
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), TRIGGER_WAIT)
        except TimeoutError:
            return f"{name} (timeout)"
        if name == "detour":
            await asyncio.sleep(rng.uniform(0.0, 0.005))
        return name


async def kill_nine(kind: str, work: Path, plan: FaultPlan, log: Any) -> dict[str, Any]:
    rng = random.Random(plan.seed)
    sink = TallySink()
    await sink.start()
    system = make(kind, fresh(work / f"kill-{kind}"), sink, plan.src)
    ledger = Ledger()
    phase: dict[int, str] = {}
    triggers = Triggers()
    sink.listener = triggers.stand_in
    stop = asyncio.Event()
    kills: list[dict[str, Any]] = []
    try:
        await asyncio.to_thread(system.start)
        boxes = SeqBoxes({"pc": system.maildir(PC), "detour": system.maildir(DETOUR)})

        def staged(i: int) -> Any:
            def note(name: str) -> None:
                phase[i] = name
                if i == 0 or name == "dot":  # sender 0 is the slow one: its DATA takes a while
                    triggers.stage(name)
            return note

        async def sender(i: int) -> None:
            for n in range(1_000_000):
                if stop.is_set():
                    return
                slow = i == 0
                sent = await ledger.send(system.smtp_port, f"k{i}-{n}", refuse=rng.random() < plan.refuse_share,
                                         size=max(plan.sizes) if slow else rng.choice(plan.sizes),
                                         stage=staged(i), pace=SLOW_PACE if slow else None)
                if sent.stage == "connect":
                    await asyncio.sleep(0.05)  # the server is down: a sender tries again shortly

        def snapshot() -> dict[str, Any]:
            pc, detour, gmail, refused = boxes.seqs["pc"], boxes.seqs["detour"], sink.seqs["A"], sink.seqs["R"]
            pending = [s for s, r in ledger.acked.items() if not pc[s] or not (detour[s] if r else gmail[s])]
            return {"in_data": sum(1 for p in phase.values() if p == "data"),
                    "awaiting_250": sum(1 for p in phase.values() if p == "dot"),
                    "acked_undelivered": len(pending),
                    "refused_not_yet_detoured": sum(1 for s, r in ledger.acked.items()
                                                    if r and refused[s] and not detour[s]),
                    "acked_so_far": len(ledger.acked)}

        senders = [asyncio.ensure_future(sender(i)) for i in range(plan.senders)]
        try:
            for k in range(plan.kills):
                await asyncio.sleep(rng.uniform(plan.min_up, plan.max_up))
                aimed = await triggers.wait(TRIGGERS[k % len(TRIGGERS)], rng)
                state = {"aimed": aimed} | snapshot()
                system.crash()
                began = time.monotonic()
                await asyncio.to_thread(system.start)
                state["restart_seconds"] = round(time.monotonic() - began, 2)
                kills.append(state)
                print(f"    {kind} kill {k + 1}/{plan.kills}: {state}", file=log, flush=True)
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*senders, return_exceptions=True)
        drained = await wait_delivered(ledger, boxes, sink, plan.drain_timeout)
        await asyncio.sleep(3.0)  # late duplicates, if any, would arrive now
        boxes.close()
        counted = final_count(system, ledger, sink)
        landed = {key: sum(1 for k in kills if k[key]) for key in
                  ("in_data", "awaiting_250", "acked_undelivered", "refused_not_yet_detoured")}
        return {"system": kind, "kills": len(kills), "kills_landing": landed, "kill_log": kills,
                "drain_seconds": None if drained is None else round(drained, 1),
                "stand_in_refusals": sink.counts["R"], "client_outcomes": dict(ledger.replies)} | counted
    finally:
        await asyncio.to_thread(system.stop)
        await sink.stop()


# --- disk full ---------------------------------------------------------------------------------
async def _send_many(ledger: Ledger, port: int, tag: str, n: int, *, refuse: bool = False) -> Counter[str]:
    codes: Counter[str] = Counter()
    for i in range(n):
        sent = await ledger.send(port, f"{tag}-{i}", refuse=refuse)
        codes[f"{sent.code} {sent.text[4:9]}" if sent.code else f"no reply ({sent.stage})"] += 1
    return codes


async def _until(ready: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def disk_full(kind: str, work: Path, plan: FaultPlan, log: Any) -> dict[str, Any]:
    sink = TallySink()
    await sink.start()
    workdir = fresh(work / f"disk-{kind}")
    # maildetour: its state_dir on the tmpfs; Postfix: both instances (queues and mailboxes).
    where_full = workdir / "var" if kind == "maildetour" else workdir
    result: dict[str, Any] = {}
    try:
        with tmpfs(where_full, "48m", mode="0700" if kind == "maildetour" else "0755") as full:
            system = make(kind, workdir, sink, plan.src)
            ledger = Ledger()
            try:
                await asyncio.to_thread(system.start)
                boxes = SeqBoxes({"pc": system.maildir(PC), "detour": system.maildir(DETOUR)})
                port = system.smtp_port
                result["before"] = await _send_many(ledger, port, "before", 10)
                await wait_delivered(ledger, boxes, sink, 30)
                # Copies waiting in the queue when the disk fills: the stand-in defers them now
                # and refuses them (552) once the disk is full, so their detour is a write into it.
                await sink.command("tempfail 1")
                result["queued"] = await _send_many(ledger, port, "queued", 10, refuse=True)
                queued = [s for s in ledger.acked if s.startswith("queued")]
                await _until(lambda: all(boxes.seqs["pc"][s] for s in queued), 30)
                result["queued_detoured_before_full"] = sum(1 for s in queued if boxes.seqs["detour"][s])
                filler = await asyncio.to_thread(fill, full)
                full_at = time.monotonic()
                await sink.command("tempfail 0")
                print(f"    {kind}: disk full", file=log, flush=True)
                result["while_full"] = await _send_many(ledger, port, "full", 10)
                check = await send_from(port, bench_message("alive"), rcpt="nobody@example.com")
                result["serving_while_full"] = f"{check.code} at {check.stage}" if check.code else check.text
                await asyncio.sleep(max(0.0, plan.full_seconds - (time.monotonic() - full_at)))
                result["detour_arrivals_while_full"] = sum(boxes.seqs["detour"][s] for s in queued) - \
                    result["queued_detoured_before_full"]
                check = await send_from(port, bench_message("alive"), rcpt="nobody@example.com")
                result["serving_at_end_of_full"] = f"{check.code} at {check.stage}" if check.code else check.text
                result["server_exit_while_full"] = None if system.running() else system.exit_code()
                filler.unlink()
                freed = time.monotonic()
                print(f"    {kind}: space returned", file=log, flush=True)
                if not system.running():  # as a supervisor (systemd Restart=on-failure) would
                    await asyncio.to_thread(system.revive)
                    result["restarted_after_space_returned"] = True
                result["after"] = await _send_many(ledger, port, "after", 10)
                took = await wait_delivered(ledger, boxes, sink, 60)
                result["all_delivered_after_space_returned_s"] = (
                    None if took is None else round(time.monotonic() - freed, 1))
                await asyncio.sleep(1.0)
                boxes.close()
                result["detour_attempts"] = attempts(system, DETOUR)
                result["server_running_at_end"] = system.running()
                result |= final_count(system, ledger, sink)
            finally:
                await asyncio.to_thread(system.stop)
    finally:
        await sink.stop()
    return result


# --- downstream flapping -----------------------------------------------------------------------
async def flapping(kind: str, work: Path, plan: FaultPlan, log: Any) -> dict[str, Any]:
    sink = TallySink()
    await sink.start()
    system = make(kind, fresh(work / f"flap-{kind}"), sink, plan.src)
    ledger = Ledger(either=True)
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(system.start)
        boxes = SeqBoxes({"pc": system.maildir(PC), "detour": system.maildir(DETOUR)})

        async def trickle() -> None:
            n = 0
            while not stop.is_set():
                await ledger.send(system.smtp_port, f"f-{n}")
                n += 1
                await asyncio.sleep(1 / plan.flap_rate)

        load = asyncio.ensure_future(trickle())
        timeline = []
        began = time.monotonic()
        try:
            for state in ("up", "451", "up", "down", "up"):
                print(f"    {kind}: stand-in {state}", file=log, flush=True)
                if state == "451":
                    await sink.command("tempfail 1")
                elif state == "down":
                    await sink.stop()
                elif not sink.running:
                    await sink.start()
                else:
                    await sink.command("tempfail 0")
                timeline.append((round(time.monotonic() - began, 1), state, len(ledger.acked)))
                await asyncio.sleep(plan.flap_phase)
        finally:
            stop.set()
            await load
        took = await wait_delivered(ledger, boxes, sink, 60)
        await asyncio.sleep(1.0)
        boxes.close()
        return {"system": kind, "timeline": timeline, "drain_seconds": None if took is None else round(took, 1),
                "stand_in_451_answers": sink.counts["T"], "gmail_attempts": attempts(system, GMAIL),
                "at_stand_in": sum(1 for s in ledger.acked if sink.seqs["A"][s]),
                "in_detour": sum(1 for s in ledger.acked if boxes.seqs["detour"][s])} | final_count(system, ledger, sink)
    finally:
        await asyncio.to_thread(system.stop)
        await sink.stop()


# --- DNS outage --------------------------------------------------------------------------------
async def dns_outage(work: Path, plan: FaultPlan, log: Any) -> dict[str, Any]:
    sink = TallySink()
    await sink.start()
    dns_port = free_port()
    dnsmasq = Dnsmasq(fresh(work / "dns") / "dnsmasq", "127.0.0.1", dns_port, zones=("gmail.com",),
                      mx=(("gmail.com", "mx.gmail.com"),), a=(("mx.gmail.com", sink.host),))
    system = EditedMaildetour(
        work / "dns", free_port(), free_port(), (sink.host, sink.port),
        delivery_extra=f"smtp_port = {sink.port}\n{FAST_RETRY}",
        edits=((f'relay = {{ "gmail.com" = "{sink.host}:{sink.port}" }}', "relay = {}"),
               ('dns_servers = ["127.0.0.1:9"]', f'dns_servers = ["127.0.0.1:{dns_port}"]')),
        src=Path(plan.src) if plan.src else None)
    ledger = Ledger()
    result: dict[str, Any] = {}
    try:
        await asyncio.to_thread(dnsmasq.start)
        await asyncio.to_thread(system.start)
        boxes = SeqBoxes({"pc": system.maildir(PC), "detour": system.maildir(DETOUR)})
        port = system.smtp_port
        await _send_many(ledger, port, "dns-up", 5)
        took = await wait_delivered(ledger, boxes, sink, 30)
        result["via_mx_before"] = "delivered" if took is not None else "NOT delivered"
        before = system.attempts(GMAIL)
        await asyncio.to_thread(dnsmasq.stop)
        print("    DNS down", file=log, flush=True)
        down = time.monotonic()
        outage = Ledger()
        result["sent_during_outage"] = await _send_many(outage, port, "dns-down", 10)
        await asyncio.sleep(max(0.0, plan.outage - (time.monotonic() - down)))
        waiting = list(outage.acked)
        result["after_outage"] = {
            "acknowledged": len(waiting),
            "pc_delivered": sum(1 for s in waiting if boxes.seqs["pc"][s]),
            "gmail_delivered": sum(1 for s in waiting if sink.seqs["A"][s]),
            "detoured": sum(1 for s in waiting if boxes.seqs["detour"][s]),
            "gmail_copies_queued": system.queue_left().get("queued", 0),
            "gmail_attempts_during_outage": sum(system.attempts(GMAIL)) - sum(before),
        }
        await asyncio.to_thread(dnsmasq.start)
        print("    DNS back", file=log, flush=True)
        ledger.acked |= outage.acked
        took = await wait_delivered(ledger, boxes, sink, 60)
        result["delivered_after_dns_back_s"] = None if took is None else round(took, 1)
        await asyncio.sleep(1.0)
        boxes.close()
        result["gmail_attempts_total"] = attempts(system, GMAIL)
        return result | final_count(system, ledger, sink)
    finally:
        await asyncio.to_thread(system.stop)
        await asyncio.to_thread(dnsmasq.stop)
        await sink.stop()
