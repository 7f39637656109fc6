"""Load held: does a legitimate message still get through while attackers hold connections and
flood, and does the POP3 owner still log in during a flood of POP3 connections?

What it does:
- `smtp_load(kind, ...)` runs one system (maildetour, or the seed's Postfix recipe with its
  per-client limits applying to loopback attackers: `GuardedPostfix`) with the stand-in gmail.
  First `baseline` probes with nothing else going on; then the attackers of
  `bench.reliability_attack` (idle, slowloris-in-command and slowloris-in-DATA connections from
  127.0.0.5, flooding senders from 127.0.0.6) and, after a few seconds, probes for
  `attack_seconds`. A probe is one legitimate message from its own address (127.0.1.N, a new
  one each time, as independent senders are) and sender domain; when refused at connect or with
  a 4xx it tries again a second later, as a sending MTA would (later), for up to
  `PROBE_PATIENCE` seconds. Measured per probe: tries, connect → 250 (from its first connect),
  250 → both copies delivered (PC Maildir and stand-in gmail).
- `pop3_load(...)` (maildetour only: the recipe has no POP3): owner logins (USER/PASS, STAT,
  QUIT from 127.0.0.1) with nothing else, during a flood of unauthenticated connections from
  one address (127.0.0.7), and during one spread over `pop3_spread` addresses.

Contract: loopback only; the attack process and every system are stopped before returning.
Exposure: bench-only. Failure: a system that does not start raises; a probe that never gets
through is counted, not raised.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.client import bench_message
from bench.observe import Boxes, Sink
from bench.proc import die_with_parent, free_port, wait_port
from bench.reliability_clients import pop3_login, send_from
from bench.reliability_systems import EditedMaildetour, GuardedPostfix, fresh
from bench.scenarios import DETOUR, PC
from bench.stats import percentile

ATTACKER = "127.0.0.5"  # idle and slowloris connections
FLOODER = "127.0.0.6"  # parallel senders
POP3_ATTACKER = "127.0.0.7"
PROBE_PATIENCE = 30.0  # seconds a probe keeps trying (a real MTA would keep trying for days)
DELIVERY_TIMEOUT = 30.0
# Loopback attackers must meet the limits strangers meet: only 127.0.0.1 (the stand-in's
# deliveries back, the owner) keeps Postfix's $mynetworks-like exemption.
LIMIT_LOOPBACK = 'unlimited_clients = ["127.0.0.1/32"]'


@dataclass(frozen=True, slots=True)
class Probe:
    tries: int
    refusals: tuple[str, ...]  # "421 at greeting", "connect: ConnectionRefusedError", ...
    accept_ms: float | None  # first connect -> 250 (None: never accepted)
    deliver_ms: float | None  # 250 -> both copies arrived (None: not within the timeout)


def summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}


def probe_report(probes: list[Probe]) -> dict[str, Any]:
    accepted = [p for p in probes if p.accept_ms is not None]
    refusals: dict[str, int] = {}
    for p in probes:
        for r in p.refusals:
            refusals[r] = refusals.get(r, 0) + 1
    return {"probes": len(probes), "accepted": len(accepted),
            "accepted_first_try": sum(1 for p in accepted if p.tries == 1),
            "never_accepted": len(probes) - len(accepted),
            "delivered": sum(1 for p in accepted if p.deliver_ms is not None),
            "refusals": refusals,
            "connect_to_250_ms": summary([p.accept_ms for p in accepted if p.accept_ms is not None]),
            "to_delivery_ms": summary([p.deliver_ms for p in accepted if p.deliver_ms is not None])}


async def probe(port: int, sink: Sink, boxes: Boxes, *, seq: str, n: int) -> Probe:
    source = f"127.0.1.{n % 250 + 1}"
    sender = f"alice@legit{n % 250}.example"
    to_gmail, to_pc = sink.expect(seq, "A"), boxes.expect("pc", seq)
    data = bench_message(seq)
    first = time.monotonic_ns()
    refusals: list[str] = []
    tries = 0
    while True:
        tries += 1
        sent = await send_from(port, data, source=source, sender=sender, timeout=PROBE_PATIENCE)
        if sent.accepted:
            break
        refusals.append(f"{sent.code} at {sent.stage}" if sent.code else f"{sent.stage}: {sent.text}")
        if (time.monotonic_ns() - first) / 1e9 > PROBE_PATIENCE or (sent.code and sent.code >= 500):
            for future in (to_gmail, to_pc):
                future.cancel()
            return Probe(tries, tuple(refusals), None, None)
        await asyncio.sleep(1.0)
    try:
        arrived = await asyncio.wait_for(asyncio.gather(to_gmail, to_pc), DELIVERY_TIMEOUT)
        deliver_ms: float | None = (max(arrived) - sent.replied_ns) / 1e6
    except TimeoutError:
        deliver_ms = None
    return Probe(tries, tuple(refusals), (sent.replied_ns - first) / 1e6, deliver_ms)


async def probes(port: int, sink: Sink, boxes: Boxes, *, tag: str, count: int = 0, seconds: float = 0.0,
                 every: float = 0.2) -> list[Probe]:
    """`count` probes, or as many as start within `seconds`: one starts every `every` seconds,
    whatever became of the previous ones (a slow delivery does not thin out the samples)."""
    started: list[asyncio.Task[Probe]] = []
    until = time.monotonic() + seconds
    while (count and len(started) < count) or (seconds and time.monotonic() < until):
        n = len(started)
        started.append(asyncio.ensure_future(probe(port, sink, boxes, seq=f"{tag}-{n}", n=n)))
        await asyncio.sleep(every)
    return list(await asyncio.gather(*started))


class Attack:
    """The attack process (`bench.reliability_attack`): started, then stopped for its report."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Attack:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.reliability_attack", "--spec", json.dumps(self.spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, preexec_fn=die_with_parent)
        assert self._proc.stdout is not None
        first = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        if first.strip() != b"ready":
            raise RuntimeError(f"the attack process did not start: {first!r}")
        return self

    async def stop(self) -> dict[str, Any]:
        proc, self._proc = self._proc, None
        if proc is None:
            return {}
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        try:
            out = await asyncio.wait_for(proc.stdout.read(), 60)
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return {"error": "the attack process did not report"}
        report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return report

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            await self._proc.wait()


@dataclass(frozen=True, slots=True)
class LoadPlan:
    baseline: int = 30  # probes with nothing else going on
    attack_seconds: float = 40.0  # probes under attack for this long
    warm: float = 5.0  # seconds of attack before the probes start
    idle: int = 400  # from ATTACKER: idle connections
    slow_command: int = 300  # slowloris before a command line ends
    slow_data: int = 300  # slowloris inside DATA
    flood: int = 100  # parallel senders from FLOODER
    reconnect: float = 5.0  # an attacker comes back this long after being refused or cut off
    pop3_flood: int = 1000
    pop3_seconds: float = 15.0
    pop3_logins_every: float = 0.5
    pop3_spread: int = 20  # addresses of the spread POP3 flood (0 skips it)
    src: str | None = None  # run the maildetour package in this directory

    def smtp_spec(self, port: int) -> dict[str, Any]:
        groups = [{"kind": "idle", "count": self.idle, "sources": [ATTACKER]},
                  {"kind": "slow-command", "count": self.slow_command, "sources": [ATTACKER]},
                  {"kind": "slow-data", "count": self.slow_data, "sources": [ATTACKER]},
                  {"kind": "flood", "count": self.flood, "sources": [FLOODER], "reconnect": 1.0}]
        for group in groups:
            group.setdefault("reconnect", self.reconnect)
        return {"port": port, "ramp": 2.0, "max_seconds": self.attack_seconds + 120,
                "groups": [g for g in groups if g["count"]]}


def make_system(kind: str, workdir: Path, sink: Sink, src: str | None) -> Any:
    if kind == "maildetour":
        return EditedMaildetour(workdir, free_port(), free_port(), (sink.host, sink.port), smtp_extra=LIMIT_LOOPBACK,
                                src=Path(src) if src else None)
    return GuardedPostfix(workdir, free_port(), free_port(), (sink.host, sink.port))


async def smtp_load(kind: str, work: Path, plan: LoadPlan, log: Any) -> dict[str, Any]:
    sink = Sink()
    await sink.start()
    system = make_system(kind, fresh(work / f"load-{kind}"), sink, plan.src)
    try:
        await asyncio.to_thread(system.start)
        boxes = Boxes(system.maildir(PC), system.maildir(DETOUR))
        try:
            port = system.smtp_port
            calm = await probes(port, sink, boxes, tag=f"{kind}-calm", count=plan.baseline)
            print(f"    {kind}: baseline done; attacking", file=log, flush=True)
            async with Attack(plan.smtp_spec(port)) as attack:
                await asyncio.sleep(plan.warm)
                began = time.monotonic()
                busy = await probes(port, sink, boxes, tag=f"{kind}-busy", seconds=plan.attack_seconds)
                attacked = time.monotonic() - began + plan.warm
                attackers = await attack.stop()
            return {"system": kind, "baseline": probe_report(calm), "under_attack": probe_report(busy),
                    "attack_seconds": round(attacked, 1), "attackers": attackers,
                    "probe_samples": [asdict(p) for p in busy]}
        finally:
            boxes.close()
    finally:
        await asyncio.to_thread(system.stop)
        await sink.stop()


async def _logins(port: int, seconds: float, every: float) -> list[Any]:
    found = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        found.append(await pop3_login(port))
        await asyncio.sleep(every)
    return found


def login_report(logins: list[Any]) -> dict[str, Any]:
    ok = [login.seconds * 1000 for login in logins if login.ok]
    refused: dict[str, int] = {}
    for login in logins:
        if not login.ok:
            refused[login.reply] = refused.get(login.reply, 0) + 1
    return {"logins": len(logins), "ok": len(ok), "refused": refused, "login_ms": summary(ok)}


async def pop3_load(work: Path, plan: LoadPlan, log: Any) -> dict[str, Any]:
    sink = Sink()
    await sink.start()
    system = EditedMaildetour(fresh(work / "pop3"), free_port(), free_port(), (sink.host, sink.port),
                              smtp_extra=LIMIT_LOOPBACK, src=Path(plan.src) if plan.src else None)
    try:
        await asyncio.to_thread(system.start)
        port = system.pop3_port
        await asyncio.to_thread(wait_port, "127.0.0.1", port, timeout=15)  # start() waits for SMTP only
        result: dict[str, Any] = {"calm": login_report(await _logins(port, 3.0, plan.pop3_logins_every))}
        floods = [("one_address", [POP3_ATTACKER])]
        if plan.pop3_spread:
            floods.append(("spread", [f"127.0.2.{i + 1}" for i in range(plan.pop3_spread)]))
        for name, sources in floods:
            print(f"    pop3: flood from {len(sources)} address(es)", file=log, flush=True)
            spec = {"port": port, "ramp": 2.0, "max_seconds": plan.pop3_seconds + 120,
                    "groups": [{"kind": "pop3-idle", "count": plan.pop3_flood, "sources": sources,
                                "reconnect": plan.reconnect, "every": 5.0}]}
            async with Attack(spec) as attack:
                await asyncio.sleep(3.0)
                logins = await _logins(port, plan.pop3_seconds, plan.pop3_logins_every)
                attackers = await attack.stop()
            result[name] = login_report(logins) | {"addresses": len(sources), "attackers": attackers}
            await asyncio.sleep(1.0)
        return result
    finally:
        await asyncio.to_thread(system.stop)
        await sink.stop()
