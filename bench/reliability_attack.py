"""The attackers of the load-held run, in a process of their own: idle and slowloris connections
and parallel flooding senders, each group from its own loopback address.

What it does: `python3 -m bench.reliability_attack --spec JSON` starts every attacker of every
group (spread over `ramp` seconds), prints `ready`, and keeps them going until its stdin is
closed (or `max_seconds` pass); then it prints one JSON line with what each group met. Kinds:
- `idle`: connect, read the greeting, say nothing; hold until the server hangs up.
- `slow-command`: after the greeting, one byte of a command line every `every` seconds, never
  a line end (the slowloris of the command phase).
- `slow-data`: EHLO, MAIL, RCPT, DATA, then one header line every `every` seconds (the
  slowloris of DATA); if any step is refused, it holds the session like `idle`.
- `flood`: EHLO, then message after message (2 KB, to the public address) in the session, as
  fast as replies come; after a refusal it waits 0.2 s and tries again.
- `pop3-idle`: after the POP3 greeting, CAPA every `every` seconds, never a login.
When the server refuses or closes a connection, the attacker connects again after `reconnect`
seconds (attackers come back). Counts per group: connection attempts, greeted, refused at the
greeting (by reply code), failed connects, closed by the server after the greeting (and how
long they were held), peak of connections held at once; for `flood`, messages accepted and
refusals by command and code.

Contract: loopback only (the spec's addresses are checked). Exposure: bench-only; a load
generator, never pointed anywhere but our own servers. Failure: a bad spec exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.client import SmtpError, _reply, bench_message

KINDS = ("idle", "slow-command", "slow-data", "flood", "pop3-idle")
FLOOD_MESSAGE = bench_message("flood", body_bytes=2048) + b".\r\n"


@dataclass
class GroupStats:
    kind: str
    count: int
    tries: int = 0
    greeted: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # reply code at the greeting
    connect_failed: Counter[str] = field(default_factory=Counter)
    closed_by_server: int = 0
    held_seconds: list[float] = field(default_factory=list)
    held: int = 0
    peak_held: int = 0
    still_held: int = 0  # held when the run ended
    accepted: int = 0  # flood: messages that got 250
    message_refusals: Counter[str] = field(default_factory=Counter)  # flood: "MAIL 450", ...

    def report(self) -> dict[str, Any]:
        held = sorted(self.held_seconds)
        return {"kind": self.kind, "count": self.count, "tries": self.tries, "greeted": self.greeted,
                "refused": dict(self.refused), "connect_failed": dict(self.connect_failed),
                "closed_by_server": self.closed_by_server, "still_held": self.still_held,
                "peak_held": self.peak_held,
                "held_seconds_median": held[len(held) // 2] if held else None,
                "held_seconds_max": held[-1] if held else None,
                "messages_accepted": self.accepted, "message_refusals": dict(self.message_refusals)}


class _Closed(Exception):
    """The server hung up."""


async def _until_closed(reader: asyncio.StreamReader) -> None:
    while await reader.read(4096):
        pass


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, every: float,
                   pieces: list[bytes]) -> None:
    """Write the pieces in turn, one every `every` seconds, until the server hangs up."""
    async def drip() -> None:
        for i in itertools.count():
            writer.write(pieces[i % len(pieces)])
            await asyncio.sleep(every)

    dripping = asyncio.ensure_future(drip())
    try:
        await _until_closed(reader)
    finally:
        dripping.cancel()


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> int:
    writer.write(line + b"\r\n")
    try:
        code, _ = await asyncio.wait_for(_reply(reader), 60)
    except SmtpError:
        raise _Closed() from None
    return code


async def _flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: GroupStats) -> None:
    if await _command(reader, writer, b"EHLO flood.example") != 250:
        return await _until_closed(reader)
    while True:
        code = await _command(reader, writer, b"MAIL FROM:<bulk@flood.example>")
        if code != 250:
            stats.message_refusals[f"MAIL {code}"] += 1
            if code == 421:
                return
            await asyncio.sleep(0.2)
            continue
        code = await _command(reader, writer, b"RCPT TO:<ituki@example.com>")
        if code != 250:
            stats.message_refusals[f"RCPT {code}"] += 1
            if code == 421 or await _command(reader, writer, b"RSET") != 250:
                return
            await asyncio.sleep(0.2)
            continue
        if await _command(reader, writer, b"DATA") != 354:
            return
        writer.write(FLOOD_MESSAGE)
        try:
            code, _ = await asyncio.wait_for(_reply(reader), 60)
        except SmtpError:
            raise _Closed() from None
        if code == 250:
            stats.accepted += 1
        else:
            stats.message_refusals[f"DATA {code}"] += 1


async def _behave(kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  stats: GroupStats, every: float) -> None:
    match kind:
        case "idle":
            await _until_closed(reader)
        case "slow-command":
            await _trickle(reader, writer, every, [bytes([c]) for c in b"EHLO slowloris-" + b"x" * 400])
        case "slow-data":
            for line, want in ((b"EHLO slow.example", 250), (b"MAIL FROM:<slow@slow.example>", 250),
                               (b"RCPT TO:<ituki@example.com>", 250), (b"DATA", 354)):
                if await _command(reader, writer, line) != want:
                    return await _until_closed(reader)
            await _trickle(reader, writer, every, [b"X-Slow: still sending\r\n"])
        case "flood":
            await _flood(reader, writer, stats)
        case "pop3-idle":
            await _trickle(reader, writer, every, [b"CAPA\r\n"])


async def _attacker(spec: dict[str, Any], group: dict[str, Any], stats: GroupStats, index: int,
                    stopping: asyncio.Event) -> None:
    sources = group["sources"]
    source = sources[index % len(sources)]
    await asyncio.sleep(spec.get("ramp", 0.0) * index / max(1, stats.count))
    while not stopping.is_set():
        stats.tries += 1
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", spec["port"], local_addr=(source, 0)), 10)
        except (OSError, TimeoutError) as exc:
            stats.connect_failed[type(exc).__name__] += 1
            await asyncio.sleep(group.get("reconnect", 5.0))
            continue
        held_since = None
        try:
            greeting = await asyncio.wait_for(reader.readline(), 30)
            ok = greeting.startswith(b"+OK" if group["kind"] == "pop3-idle" else b"220")
            if not ok:
                stats.refused[greeting[:70].decode(errors="replace").strip() or "closed"] += 1
            else:
                stats.greeted += 1
                stats.held += 1
                stats.peak_held = max(stats.peak_held, stats.held)
                held_since = time.monotonic()
                await _behave(group["kind"], reader, writer, stats, group.get("every", 3.0))
        except (OSError, TimeoutError, _Closed, SmtpError, asyncio.IncompleteReadError):
            pass
        finally:
            if held_since is not None:
                stats.held -= 1
                if stopping.is_set():  # we hung up ourselves: the run is over
                    stats.still_held += 1
                else:
                    stats.closed_by_server += 1
                    stats.held_seconds.append(round(time.monotonic() - held_since, 2))
            writer.close()
        await asyncio.sleep(group.get("reconnect", 5.0))


async def attack(spec: dict[str, Any]) -> dict[str, Any]:
    stopping = asyncio.Event()
    groups = [(group, GroupStats(group["kind"], group["count"])) for group in spec["groups"]]
    tasks = [asyncio.ensure_future(_attacker(spec, group, stats, i, stopping))
             for group, stats in groups for i in range(group["count"])]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    try:
        await asyncio.wait_for(reader.read(), spec.get("max_seconds", 600))
    except TimeoutError:
        pass
    stopping.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"groups": [stats.report() for _, stats in groups]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.reliability_attack", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="JSON: port, ramp, max_seconds, groups")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    for group in spec["groups"]:
        if group["kind"] not in KINDS or not all(s.startswith("127.") for s in group["sources"]):
            parser.error(f"bad group {group!r}: kinds {KINDS}, loopback sources only")
    try:
        result = asyncio.run(attack(spec))
    except KeyboardInterrupt:
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
