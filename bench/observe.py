"""Where the bench sees mail arrive: the stand-in gmail's report lines and the Maildirs.

What it does: `Sink` runs `python -m bench.sink` as a child, reads its `<ns> <seq> <verdict>`
lines into counters and per-seq futures, and sends it control commands. `Boxes` watches the
PC and detour Maildirs' new/ with inotify and keeps counters and per-seq futures too (the seq
is read from the file's `X-Bench-Seq:` header, only when someone waits for it).
Both record the CLOCK_MONOTONIC time of the latest arrival, for end-to-end throughput.
`Sink(signatures=True)` also counts, per verdict, the messages that carried a DKIM-Signature
and the signatures themselves (the DKIM variant's proof that signing happened);
`Sink(chunking=False)` runs the stand-in without CHUNKING (`--no-chunking`).

Contract: the sink child is stopped by closing its stdin, then SIGTERM/SIGKILL by PID.
Exposure: bench-only. Failure: `wait_*` raise TimeoutError naming what was missing.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections import Counter
from pathlib import Path

from bench.proc import die_with_parent, free_port, wait_port
from bench.sink import message_seq
from bench.watch import MaildirWatch


class Sink:
    def __init__(self, host: str = "127.0.0.2", *, signatures: bool = False, chunking: bool = True) -> None:
        self.host = host
        self.port = free_port(host)
        self.signatures = signatures
        self.chunking = chunking
        self.counts: Counter[str] = Counter()
        self.signed: Counter[str] = Counter()  # per verdict: messages with a DKIM-Signature
        self.signature_fields = 0  # DKIM-Signature fields on accepted messages
        self.last_ns = 0
        self._waiting: dict[tuple[str, str], asyncio.Future[int]] = {}
        self._acks: asyncio.Queue[None] = asyncio.Queue()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.sink", "--host", self.host, "--port", str(self.port),
            *(["--signatures"] if self.signatures else []), *([] if self.chunking else ["--no-chunking"]),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, preexec_fn=die_with_parent)
        assert self._proc.stdout is not None
        first = await asyncio.wait_for(self._proc.stdout.readline(), 15)
        if first.strip() != b"ready":
            raise RuntimeError(f"stand-in gmail did not start: {first!r}")
        self._reader = asyncio.create_task(self._read())
        await asyncio.to_thread(wait_port, self.host, self.port, timeout=5)

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            parts = line.split()
            if parts == [b"ok"]:
                self._acks.put_nowait(None)
                continue
            stamp, seq, verdict = int(parts[0]), parts[1].decode(), parts[2].decode()
            self.counts[verdict] += 1
            if len(parts) > 3 and (found := int(parts[3])):
                self.signed[verdict] += 1
                if verdict == "A":
                    self.signature_fields += found
            self.last_ns = max(self.last_ns, stamp)
            future = self._waiting.pop((seq, verdict), None)
            if future is not None and not future.done():
                future.set_result(stamp)

    async def command(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        await self._proc.stdin.drain()
        await asyncio.wait_for(self._acks.get(), 10)

    def expect(self, seq: str, verdict: str = "A") -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[(seq, verdict)] = future
        return future

    async def keep(self, where: Path, n: int) -> None:
        """Have the stand-in write the next `n` accepted messages to where/1.eml … n.eml."""
        await self.command(f"keep {n} {where}")

    def reset(self) -> None:
        self.counts.clear()
        self.signed.clear()
        self.signature_fields = 0
        self.last_ns = 0

    async def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
        self._proc = None


class Boxes:
    """inotify on the PC and detour Maildirs of one system (and, for the IMAP detour path, the
    Maildir of the IMAP server the detour appends into: box "imap")."""

    def __init__(self, pc: Path, detour: Path, imap: Path | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self.last_ns = 0
        self._waiting: dict[tuple[str, str], asyncio.Future[int]] = {}
        self._watch = MaildirWatch(asyncio.get_running_loop())
        boxes = {"pc": pc, "detour": detour} | ({"imap": imap} if imap is not None else {})
        for box, maildir in boxes.items():
            self._watch.add(maildir / "new", functools.partial(self._arrived, box))

    def _arrived(self, box: str, stamp: int, path: Path) -> None:
        self.counts[box] += 1
        self.last_ns = max(self.last_ns, stamp)
        if not self._waiting:
            return
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except FileNotFoundError:
            return
        future = self._waiting.pop((box, message_seq(head)), None)
        if future is not None and not future.done():
            future.set_result(stamp)

    def expect(self, box: str, seq: str) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[(box, seq)] = future
        return future

    @property
    def overflowed(self) -> bool:
        return self._watch.overflowed

    def reset(self) -> None:
        self.counts.clear()
        self.last_ns = 0

    def close(self) -> None:
        self._watch.close()
