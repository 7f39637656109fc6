"""The run: rounds A B A B … of maildetour and the Postfix recipe, then the deferred-queue run.

What it does: `run(plan, out)` measures each system once per round (fresh state each time):
warm-up, success-path and detour-path latencies, throughput with 0 % and 10 % refused, then a
restart with Postfix's `max_idle = 1s` for the idle latencies, (maildetour) a restart with the
detour into IMAP, and a restart with DKIM signing on (maildetour `[signing]`; the recipe's MTA1
with OpenDKIM) for one more 0 %-refused throughput run, valid only if every copy the stand-in
accepted carried a DKIM-Signature and the kept ones verify (dkimpy and OpenDKIM, with the
run's public key; `bench.dkim_check`). The stand-in gmail offers CHUNKING as Gmail does unless
`plan.gmail_chunking` is false (`--gmail-chunking off`). It writes `out/results.json`
(every sample) and `out/results.md` (the tables) and returns the JSON-able dict.

Contract: loopback only; every process is stopped before `run` returns or raises; working
directories are removed unless `plan.keep`. Exposure: bench-only. Failure: the first phase that
fails aborts the run with its message (a partial result is still written).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.dkim_check import check as check_signatures
from bench.dovecot import DovecotImap
from bench.maildetour_system import DKIM_SELECTOR as MAILDETOUR_SELECTOR
from bench.maildetour_system import MaildetourSystem
from bench.memory import deferred_queue
from bench.observe import Boxes, Sink
from bench.postfix import DKIM_DOMAIN, PostfixRecipe
from bench.postfix import DKIM_SELECTOR as POSTFIX_SELECTOR
from bench.proc import free_port
from bench.stats import distribution, markdown_table, memory_table, signing_table, summarize


@dataclass(frozen=True, slots=True)
class Plan:
    systems: tuple[str, ...] = ("maildetour", "postfix")
    rounds: int = 3
    success: int = 200
    detour: int = 100
    throughput: int = 5000
    sessions: int = 20
    size: int = 5120
    idle: int = 5  # success + detour pairs per round, each after `idle_gap` seconds of quiet
    idle_gap: float = 3.0
    imap_detour: int = 100  # maildetour: refused messages detoured into IMAP (Dovecot); 0 skips
    dkim: int = 5000  # messages of the throughput run with DKIM signing on (0 % refused); 0 skips
    memory: int = 100_000  # 0: skip the deferred-queue run
    memory_size: int = 1024
    keep: bool = False
    maildetour_src: str | None = None  # run the maildetour package found in this directory
    gmail_chunking: bool = True  # the stand-in gmail offers CHUNKING (BDAT), as Gmail's MX does


# The hidden destination's detour in the IMAP run: the IMAP step first, the POP box after it.
IMAP_CHAIN = '["imap:bench", "ituki@gm.example.net"]'
DKIM_KEPT = 3  # copies of the DKIM run the stand-in keeps, whose signatures are then verified
SELECTORS = {"maildetour": MAILDETOUR_SELECTOR, "postfix": POSTFIX_SELECTOR}

QUICK = Plan(rounds=1, success=40, detour=20, throughput=500, idle=2, imap_detour=10, dkim=500, memory=2000)


def make_system(kind: str, workdir: Path, gmail: tuple[str, int], *, idle: bool,
                src: str | None = None, imap: DovecotImap | None = None, dkim: bool = False) -> scenarios.System:
    if kind == "maildetour":
        return MaildetourSystem(workdir, free_port(), free_port(), gmail, src=Path(src) if src else None,
                                detour=IMAP_CHAIN if imap else None, extra=imap.imap_table() if imap else "",
                                dkim=dkim)
    if kind == "postfix":
        return PostfixRecipe(workdir, free_port(), free_port(), gmail,
                             max_idle="1s" if idle else "100s", dkim=dkim)
    raise ValueError(f"unknown system {kind!r}")


async def _with_system(kind: str, workdir: Path, sink: Sink, *, idle: bool, plan: Plan,
                       phases: Any, imap: DovecotImap | None = None, dkim: bool = False) -> dict[str, Any]:
    system = make_system(kind, workdir, (sink.host, sink.port), idle=idle, src=plan.maildetour_src, imap=imap,
                         dkim=dkim)
    await asyncio.to_thread(system.start)
    boxes = Boxes(system.maildir(scenarios.PC), system.maildir(scenarios.DETOUR),
                  imap.maildir if imap else None)
    try:
        await scenarios.warm_up(system, sink, boxes, tag=workdir.name, box="imap" if imap else "detour")
        result: dict[str, Any] = await phases(system, boxes)
        return result
    finally:
        boxes.close()
        await asyncio.to_thread(system.stop)


def _throughput(t: scenarios.Throughput) -> dict[str, Any]:
    found = dataclasses.asdict(t)
    found["cpu_ms_per_msg"] = t.cpu_seconds * 1000 / t.messages
    return found


async def _signed_throughput(system: Any, sink: Sink, boxes: Boxes, plan: Plan, kept: Path) -> dict[str, Any]:
    """The 0 %-refused throughput run with signing on, and the proof that signing happened:
    every copy the stand-in accepted carried a DKIM-Signature, and the kept ones verify with
    both verifiers."""
    await sink.keep(kept, DKIM_KEPT)
    found = _throughput(await scenarios.throughput(system, sink, boxes, n=plan.dkim, sessions=plan.sessions,
                                                   size=plan.size, share=0.0, timeout=60 + plan.dkim / 20))
    if found["signed_copies"] != found["gmail_copies"] or not found["gmail_copies"]:
        raise RuntimeError(f"{system.name}: DKIM run invalid: {found['signed_copies']} of "
                           f"{found['gmail_copies']} copies at the stand-in carried a DKIM-Signature\n{system.logs()}")
    verified = check_signatures(sorted(kept.glob("*.eml")), system.dkim_key, domain=DKIM_DOMAIN,
                                selector=SELECTORS[system.name])
    if verified["checked"] != DKIM_KEPT or not verified["dkim_pass"] == verified["opendkim_pass"] == DKIM_KEPT:
        raise RuntimeError(f"{system.name}: DKIM run invalid: kept copies verified {verified}")
    return found | {"verified": verified}


async def measure(kind: str, rnd: int, plan: Plan, work: Path) -> dict[str, Any]:
    sink = Sink(signatures=True, chunking=plan.gmail_chunking)
    await sink.start()
    tag = f"{kind}-r{rnd}"
    try:
        async def busy(system: scenarios.System, boxes: Boxes) -> dict[str, Any]:
            success = await scenarios.latencies(system, sink, boxes, n=plan.success, detour=False, tag=f"{tag}-s")
            detour = await scenarios.latencies(system, sink, boxes, n=plan.detour, detour=True, tag=f"{tag}-d")
            timeout = 60 + plan.throughput / 20
            t0 = await scenarios.throughput(system, sink, boxes, n=plan.throughput, sessions=plan.sessions,
                                            size=plan.size, share=0.0, timeout=timeout)
            t10 = await scenarios.throughput(system, sink, boxes, n=plan.throughput, sessions=plan.sessions,
                                             size=plan.size, share=0.1, timeout=timeout)
            await sink.command("share 0")
            return {"success": distribution(success), "detour": distribution(detour),
                    "success_ms": success, "detour_ms": detour,
                    "throughput_0": _throughput(t0), "throughput_10": _throughput(t10)}

        async def quiet(system: scenarios.System, boxes: Boxes) -> dict[str, Any]:
            success, detour = await scenarios.idle_latencies(system, sink, boxes, n=plan.idle,
                                                             gap=plan.idle_gap, tag=f"{tag}-i")
            return {"idle_success": distribution(success), "idle_detour": distribution(detour),
                    "idle_success_ms": success, "idle_detour_ms": detour}

        async def into_imap(system: scenarios.System, boxes: Boxes) -> dict[str, Any]:
            found = await scenarios.latencies(system, sink, boxes, n=plan.imap_detour, detour=True,
                                              tag=f"{tag}-m", box="imap")
            return {"imap_detour": distribution(found), "imap_detour_ms": found}

        async def signing(system: scenarios.System, boxes: Boxes) -> dict[str, Any]:
            return {"throughput_dkim": await _signed_throughput(system, sink, boxes, plan, work / f"{tag}-kept")}

        result = await _with_system(kind, work / tag, sink, idle=False, plan=plan, phases=busy)
        if plan.idle:
            result |= await _with_system(kind, work / f"{tag}-idle", sink, idle=True, plan=plan, phases=quiet)
        if plan.imap_detour and kind == "maildetour":
            dovecot = DovecotImap()
            try:
                await asyncio.to_thread(dovecot.start)
                result |= await _with_system(kind, work / f"{tag}-imap", sink, idle=False, plan=plan,
                                             phases=into_imap, imap=dovecot)
            finally:
                await asyncio.to_thread(dovecot.stop)
        if plan.dkim:
            result |= await _with_system(kind, work / f"{tag}-dkim", sink, idle=False, plan=plan,
                                         phases=signing, dkim=True)
            signed, plain = result["throughput_dkim"], result["throughput_0"]
            signed["extra_cpu_ms_per_msg"] = signed["cpu_ms_per_msg"] - plain["cpu_ms_per_msg"]
        return result
    finally:
        await sink.stop()
        if not plan.keep:
            for path in (work / tag, work / f"{tag}-idle", work / f"{tag}-imap", work / f"{tag}-dkim",
                         work / f"{tag}-kept"):
                shutil.rmtree(path, ignore_errors=True)


def machine() -> dict[str, Any]:
    def first(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:")))
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gb": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "postfix": first(["postconf", "-d", "-h", "mail_version"]),
            "commit": first(["git", "rev-parse", "--short", "HEAD"]),
            "uncommitted_changes": bool(first(["git", "status", "--porcelain", "--", "maildetour"]))}


def _write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    rows = summarize(result["rounds"])
    text = [f"# Bench results ({result['mode']}, {result['started']})", "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()), "",
            markdown_table(rows), "", signing_table(result["rounds"]), "", memory_table(result.get("memory")), ""]
    (out / "results.md").write_text("\n".join(text))


async def run(plan: Plan, out: Path, *, mode: str, log: Any = sys.stderr) -> dict[str, Any]:
    work = out / "work"
    result: dict[str, Any] = {"mode": mode, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "plan": dataclasses.asdict(plan), "machine": machine(), "rounds": []}
    began = time.monotonic()
    try:
        for rnd in range(1, plan.rounds + 1):
            entry: dict[str, Any] = {"round": rnd}
            result["rounds"].append(entry)
            for kind in plan.systems:
                print(f"[{time.monotonic() - began:6.1f}s] round {rnd}: {kind}", file=log, flush=True)
                entry[kind] = await measure(kind, rnd, plan, work)
                _write(out, result)
        if plan.memory and "maildetour" in plan.systems:
            print(f"[{time.monotonic() - began:6.1f}s] deferred-queue run: {plan.memory} messages",
                  file=log, flush=True)
            memory = await deferred_queue(work / "memory", n=plan.memory, size=plan.memory_size,
                                          timeout=120 + plan.memory / 50,
                                          src=Path(plan.maildetour_src) if plan.maildetour_src else None)
            result["memory"] = dataclasses.asdict(memory)
    finally:
        result["seconds"] = round(time.monotonic() - began, 1)
        _write(out, result)
        if not plan.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"[{result['seconds']:6.1f}s] done; results in {out}", file=log, flush=True)
    return result
