"""The reliability run (issue 10's figures): load held, faults survived, memory, bad inputs.

What it does: `run(plan, out)` runs the parts in `plan.parts`, each on a fresh state directory,
on loopback, with the real `maildetour serve` (and the seed's two-Postfix recipe where the same
test applies to it), and writes `out/reliability.json` (every figure, plus the machine, the
commit and the command) and `out/reliability.md` (the tables). Parts:
- `load`: legitimate messages while 1,000 idle/slowloris connections and 100 flooding senders
  hit the server (`bench.reliability_load.smtp_load`), maildetour and the Postfix recipe;
- `pop3`: the owner's POP3 logins during a flood of unauthenticated connections (maildetour);
- `kill`, `disk`, `flap`, `dns`: kill -9 under load, a full disk, a flapping downstream, a DNS
  outage (`bench.reliability_faults`); the first three for the Postfix recipe too (Postfix
  reads DNS through the system's resolver, which the run may not repoint);
- `memory`: 100 concurrent 25 MB messages (maildetour and Postfix), a backlog of them to a
  deferring host, and what short lines cost (`bench.reliability_memory`);
- `fuzz`: no run of its own; the Hypothesis statistics of `MAILDETOUR_FUZZ=long` runs given
  with `--fuzz-log` are read into cases and failures per test (a later log wins for a test).

Contract: every process started is stopped and every mount undone before `run` returns or
raises; working directories are removed unless `plan.keep`. A part that fails is recorded with
its error and the run goes on; speed is never judged here. Exposure: bench-only (root for
Postfix and the tmpfs). Failure: `run` returns the result; `main` exits 1 when a part failed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import reliability_faults as rfaults
from bench import reliability_load as rload
from bench import reliability_memory as rmemory
from bench.reliability_report import render
from bench.run import machine

PARTS = ("load", "pop3", "kill", "disk", "flap", "dns", "memory", "fuzz")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "reliability"


@dataclass(frozen=True, slots=True)
class Plan:
    parts: tuple[str, ...] = PARTS
    load: rload.LoadPlan = field(default_factory=rload.LoadPlan)
    faults: rfaults.FaultPlan = field(default_factory=rfaults.FaultPlan)
    memory: rmemory.MemoryPlan = field(default_factory=rmemory.MemoryPlan)
    postfix: bool = True  # run the recipe where the same test applies to it
    fuzz_logs: tuple[str, ...] = ()
    keep: bool = False


QUICK = Plan(
    load=rload.LoadPlan(baseline=10, attack_seconds=6.0, warm=2.0, idle=100, slow_command=50, slow_data=50,
                       flood=20, pop3_flood=100, pop3_seconds=4.0, pop3_spread=5),
    faults=rfaults.FaultPlan(kills=5, senders=4, full_seconds=4.0, flap_phase=2.5, flap_rate=4.0, outage=5.0),
    memory=rmemory.MemoryPlan(concurrent=10, backlog=4),
    postfix=False)


def read_fuzz_logs(paths: tuple[str, ...]) -> dict[str, Any]:
    """Cases (passing + failing examples over every phase) and failing examples per test, from
    pytest `--hypothesis-show-statistics` output; a test in a later log replaces an earlier."""
    tests: dict[str, dict[str, Any]] = {}
    summaries = []
    for path in paths:
        text = Path(path).read_text(errors="replace")
        stats = text.split("Hypothesis Statistics", 1)[-1]
        for block in re.split(r"\n(?=tests/\S+::\S+:\n)", stats):
            head = re.match(r"\s*(tests/\S+)::(\S+):\n", block)
            if not head:
                continue
            found = [tuple(map(int, m)) for m in re.findall(
                r"(\d+) passing examples?, (\d+) failing examples?, (\d+) invalid", block)]
            tests[head.group(2)] = {"file": head.group(1), "log": path,
                                    "cases": sum(p + f for p, f, _ in found),
                                    "failing": sum(f for _, f, _ in found),
                                    "stopped": (re.findall(r"Stopped because (.+)", block) or ["?"])[-1]}
        summaries += [line.strip("= ") for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return {"tests": tests, "summaries": summaries}


async def _part(name: str, plan: Plan, work: Path, log: Any) -> Any:
    match name:
        case "load":
            found = {"maildetour": await rload.smtp_load("maildetour", work, plan.load, log)}
            if plan.postfix:
                found["postfix"] = await rload.smtp_load("postfix", work, plan.load, log)
            return found
        case "pop3":
            return await rload.pop3_load(work, plan.load, log)
        case "kill" | "disk" | "flap":
            run_part = {"kill": rfaults.kill_nine, "disk": rfaults.disk_full, "flap": rfaults.flapping}[name]
            found = {"maildetour": await run_part("maildetour", work, plan.faults, log)}
            if plan.postfix:
                found["postfix"] = await run_part("postfix", work, plan.faults, log)
            return found
        case "dns":
            return await rfaults.dns_outage(work, plan.faults, log)
        case "memory":
            found = {"receive": {"maildetour": await rmemory.receive("maildetour", work, plan.memory, log)}}
            if plan.postfix:
                found["receive"]["postfix"] = await rmemory.receive("postfix", work, plan.memory, log)
            found["backlog"] = await rmemory.backlog(work, plan.memory, log)
            found["lines"] = await rmemory.line_cost(work, plan.memory, log)
            return found
        case "fuzz":
            return read_fuzz_logs(plan.fuzz_logs) if plan.fuzz_logs else {"skipped": "no --fuzz-log given"}
    raise ValueError(f"unknown part {name!r}")


def _write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "reliability.md").write_text(render(result))


async def run(plan: Plan, out: Path, *, mode: str, command: str, log: Any = sys.stderr) -> dict[str, Any]:
    work = out / "work"
    result: dict[str, Any] = {"mode": mode, "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "plan": dataclasses.asdict(plan), "machine": machine(), "parts": {}}
    began = time.monotonic()
    try:
        for name in plan.parts:
            print(f"[{time.monotonic() - began:6.1f}s] {name}", file=log, flush=True)
            part_began = time.monotonic()
            try:
                found = await _part(name, plan, work, log)
            except (Exception, TimeoutError) as exc:  # a failed part says so and the run goes on
                found = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
                print(f"    {name} FAILED: {found['error']}", file=log, flush=True)
            result["parts"][name] = {"seconds": round(time.monotonic() - part_began, 1), "result": found}
            _write(out, result)
    finally:
        result["seconds"] = round(time.monotonic() - began, 1)
        _write(out, result)
        if not plan.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"[{result['seconds']:6.1f}s] done; results in {out}", file=log, flush=True)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small counts, no Postfix: checks the harness (1-2 min)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {','.join(PARTS)}")
    p.add_argument("--postfix", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the seed's Postfix recipe where the test applies (default: on, off with --quick)")
    p.add_argument("--kills", type=int, help="kill -9 repetitions (default 30, quick 5)")
    p.add_argument("--fuzz-log", action="append", default=[], metavar="FILE",
                   help="pytest --hypothesis-show-statistics output of a MAILDETOUR_FUZZ=long run (repeatable)")
    p.add_argument("--maildetour-src", type=Path,
                   help="run the maildetour package in this directory (e.g. an unpacked `git archive`)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    p.add_argument("--keep", action="store_true", help="keep the systems' working directories")


def plan_from(args: argparse.Namespace) -> Plan | str:
    """The plan the arguments ask for, or a usage error."""
    plan = QUICK if args.quick else Plan()
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if not parts or any(p not in PARTS for p in parts):
        return f"--parts takes some of {','.join(PARTS)}"
    changes: dict[str, Any] = {"parts": parts, "keep": args.keep,
                               "fuzz_logs": tuple(str(Path(f).resolve()) for f in args.fuzz_log)}
    if args.postfix is not None:
        changes["postfix"] = args.postfix
    src = str(args.maildetour_src.resolve()) if args.maildetour_src else None
    changes |= {"load": dataclasses.replace(plan.load, src=src),
                "memory": dataclasses.replace(plan.memory, src=src)}
    if args.kills is not None:
        if args.kills < 1:
            return "--kills takes a positive number"
        plan = dataclasses.replace(plan, faults=dataclasses.replace(plan.faults, kills=args.kills))
    changes["faults"] = dataclasses.replace(plan.faults, src=src)
    return dataclasses.replace(plan, **changes)


def main(args: argparse.Namespace, argv: list[str], cancellable: Callable[[Coroutine[Any, Any, object]],
         Coroutine[Any, Any, None]]) -> int:
    """`python3 -m bench reliability ...` (parsed by `bench.__main__`, whose `cancellable` makes
    SIGTERM cancel the run like Ctrl-C). Exit codes: 0 ok, 1 a part failed, 2 usage."""
    plan = plan_from(args)
    if isinstance(plan, str):
        print(f"bench: {plan}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {}

    async def work() -> None:
        result.update(await run(plan, args.out, mode="quick" if args.quick else "full",
                                command="python3 -m bench " + " ".join(argv)))

    try:
        asyncio.run(cancellable(work()))
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print((args.out / "reliability.md").read_text())
    failed = [name for name, part in result["parts"].items() if "error" in part["result"]]
    if failed:
        print(f"bench: part(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
