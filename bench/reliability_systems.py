"""The reliability run's systems: maildetour with config edits, a Postfix recipe that limits
loopback clients too, a stand-in gmail that counts every message, and Maildir tallies.

What it does:
- `EditedMaildetour`: `MaildetourSystem` whose config is the seed file with keys added to
  `[smtp]` (e.g. `unlimited_clients`, so that loopback attackers are limited like strangers)
  and literal text edits (e.g. the gmail relay line removed for an MX lookup).
- `GuardedPostfix`: the seed's two-Postfix recipe (`PostfixRecipe`) with `mynetworks` on MTA1
  narrowed to 127.0.0.1/32, so Postfix's per-client limits (anvil) apply to other loopback
  addresses as they would to strangers, `main_extra` added to MTA1's main.cf and `both_extra`
  to both instances'.
- `TallySink`: the stand-in gmail (`Sink`) that also counts each `X-Bench-Seq` per verdict.
- `SeqBoxes`: inotify on Maildirs' new/ that reads the seq of every arriving file;
  `maildir_seqs` counts the seqs of the files a Maildir holds (new/ and cur/).
- Both systems answer what the fault runs ask (`crash`, `running`, `revive`, `queue_left`,
  `attempts`, `errors`): maildetour from its queue database (read-only) and log, Postfix from
  its queue directories and logs.

Contract: loopback only; every process is stopped by the PID we started. Exposure: bench-only.
Failure: RuntimeError with the server's log tail when maildetour does not start.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.maildetour_system import MaildetourSystem, seed_config
from bench.observe import Sink
from bench.postfix import PostfixRecipe
from bench.proc import children, die_with_parent, group_members, wait_gone, wait_port
from bench.sink import message_seq
from bench.watch import MaildirWatch

SMTP_ANCHOR = 'max_message_size = "25MB"'  # the last key of the seed's [smtp] table
HEAD = 4096  # the bench headers sit at the top of a message


@dataclass
class EditedMaildetour(MaildetourSystem):
    """The seed config with `smtp_extra` added to [smtp] and `edits` (old, new) applied."""

    smtp_extra: str = ""
    edits: tuple[tuple[str, str], ...] = ()

    def config_text(self) -> str:
        text = seed_config(smtp_port=self.smtp_port, pop3_port=self.pop3_port, gmail=self.gmail,
                           delivery_extra=self.delivery_extra, detour_after=self.detour_after,
                           detour=self.detour, extra=self.extra)
        for old, new in ((SMTP_ANCHOR, f"{SMTP_ANCHOR}\n{self.smtp_extra}"), *self.edits):
            if old not in text:
                raise RuntimeError(f"the seed config has no {old.strip()!r} to edit")
            text = text.replace(old, new, 1)
        return text

    def start(self) -> None:
        """As `MaildetourSystem.start`, with `config_text()` as the config."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "maildetour.toml"
        config.write_text(self.config_text(), encoding="utf-8")
        for address in ("ituki@pc.example.net", "ituki@gm.example.net"):
            for sub in ("tmp", "new", "cur"):
                (self.maildir(address) / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        env = dict(os.environ)
        if self.src is not None:  # another checkout's package (e.g. an unpacked `git archive`)
            env["PYTHONPATH"] = os.pathsep.join([str(self.src.resolve()), env.get("PYTHONPATH", "")])
        with open(self.workdir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "maildetour.cli", "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                preexec_fn=die_with_parent)
        try:
            wait_port("127.0.0.1", self.smtp_port, timeout=30, alive=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"maildetour did not start ({exc}):\n{self.logs()}") from None

    # --- what the fault runs ask of a system (GuardedPostfix answers the same) ---------------
    def crash(self) -> None:
        """SIGKILL, as a crash: no shutdown of any kind. The SMTP intake workers die with the
        main process (PR_SET_PDEATHSIG); until they have, one of them still holds the SMTP port,
        so the restart (and its time) begins once they are gone."""
        if self.proc is not None:
            workers = children(self.proc.pid)
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            wait_gone(workers, timeout=10)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def revive(self) -> None:
        """Start again after the process died (as a supervisor would)."""
        self.proc = None
        self.start()

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        """Read the queue database (read-only; the server may be running)."""
        conn = sqlite3.connect(f"file:{self.state / 'queue.sqlite3'}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def queue_left(self) -> dict[str, int]:
        rows = self.query("SELECT state, count(*) FROM copies WHERE state != 'delivered' GROUP BY state")
        return {str(state): int(n) for state, n in rows}  # type: ignore[call-overload]

    def attempts(self, target: str) -> list[int]:
        """Attempts of each copy at `target`, from the queue's outcome events."""
        rows = self.query("SELECT copy_id, count(*) FROM events WHERE target = ? AND kind IN "
                          "('delivered', 'deferred', 'refused') GROUP BY copy_id", target)
        return [int(n) for _, n in rows]  # type: ignore[call-overload]

    def _log(self) -> str:
        try:
            return (self.workdir / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tracebacks(self) -> int:
        return self._log().count("Traceback")

    def errors(self) -> list[str]:
        """The exception lines of the tracebacks in the server's log, each once, in order."""
        found = [line.strip(" |") for line in self._log().splitlines()
                 if re.match(r"^[\s|]*[\w.]+(Error|Exception|Group): ", line)]
        return list(dict.fromkeys(found))


@dataclass
class GuardedPostfix(PostfixRecipe):
    """The recipe with MTA1's per-client limits applying to every loopback address but its own
    (MTA2 relays back from 127.0.0.1), `main_extra` added to MTA1's main.cf and `both_extra` to
    both instances' (e.g. shorter retry timers)."""

    main_extra: dict[str, str] = field(default_factory=dict)
    both_extra: dict[str, str] = field(default_factory=dict)

    def _common(self, name: str) -> dict[str, str]:
        return super()._common(name) | self.both_extra

    def _mta1_cf(self) -> dict[str, str]:
        params = super()._mta1_cf()
        params["mynetworks"] = "127.0.0.1/32"
        params.update(self.main_extra)
        return params

    def pids(self) -> list[int]:
        """Every live process of both instances (the masters and their children)."""
        found: list[int] = []
        for inst in self.instances:
            if inst.proc is not None and inst.proc.poll() is None:
                found += group_members(inst.proc.pid) or [inst.proc.pid]
        return found

    # --- the fault runs' interface (see EditedMaildetour) -------------------------------------
    def crash(self) -> None:
        """SIGKILL to every process of both instances at once: the machine's crash, for Postfix."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stop()  # reaps the masters, forgets the instances

    def running(self) -> bool:
        return bool(self.instances) and all(i.proc is not None and i.proc.poll() is None for i in self.instances)

    def exit_code(self) -> int | None:
        codes = [i.proc.poll() for i in self.instances if i.proc is not None]
        return next((c for c in codes if c is not None), None)

    def revive(self) -> None:
        self.stop()
        self.start()

    def queue_left(self) -> dict[str, int]:
        """Queue files of both instances not yet delivered (incoming, active, deferred, hold);
        `incomplete`: files a killed cleanup left half-written (mode without the owner's x bit:
        never acknowledged; `postfix start` would purge them, the bench starts master directly)."""
        found: Counter[str] = Counter()
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for inst in ("mta1", "mta2"):
                for top, _, files in os.walk(self.workdir / inst / "queue" / name):
                    for file in files:
                        try:
                            complete = os.stat(Path(top) / file).st_mode & 0o100
                        except FileNotFoundError:
                            continue
                        found[name if complete or name == "maildrop" else "incomplete"] += 1
        return dict(found)

    def attempts(self, target: str) -> list[int]:
        """Delivery attempts per queue file for `target`, from MTA1's log (status= lines)."""
        per: Counter[str] = Counter()
        for line in self._log("mta1").splitlines():
            if f"to=<{target}>" in line and " status=" in line:
                per[line.split("]: ", 1)[-1].split(":", 1)[0]] += 1
        return list(per.values())

    def _log(self, name: str) -> str:
        try:
            return (self.workdir / name / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tracebacks(self) -> int:
        """Postfix's equivalent: fatal and panic lines in both logs."""
        return len(self.errors())

    def errors(self) -> list[str]:
        lines = [line for name in ("mta1", "mta2") for line in self._log(name).splitlines()
                 if " fatal: " in line or " panic: " in line]
        return list(dict.fromkeys(line.split("]: ", 1)[-1] for line in lines))


class TallySink(Sink):
    """The stand-in gmail, also counting each seq per verdict (A accepted, R refused, T 4xx)."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        super().__init__(host)
        self.seqs: dict[str, Counter[str]] = {"A": Counter(), "R": Counter(), "T": Counter()}
        self.listener: Callable[[str, str], None] | None = None  # called with (seq, verdict)

    @property
    def running(self) -> bool:
        return self._proc is not None

    async def _read(self) -> None:
        """`Sink._read`, plus the per-seq counts."""
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            parts = line.split()
            if parts == [b"ok"]:
                self._acks.put_nowait(None)
                continue
            stamp, seq, verdict = int(parts[0]), parts[1].decode(), parts[2].decode()
            self.counts[verdict] += 1
            self.seqs.setdefault(verdict, Counter())[seq] += 1
            self.last_ns = max(self.last_ns, stamp)
            future = self._waiting.pop((seq, verdict), None)
            if future is not None and not future.done():
                future.set_result(stamp)
            if self.listener is not None:
                self.listener(seq, verdict)


def _seq_of(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return message_seq(f.read(HEAD))
    except FileNotFoundError:
        return None


def maildir_seqs(maildir: Path) -> Counter[str]:
    """How many files with each X-Bench-Seq the Maildir holds (new/ and cur/)."""
    found: Counter[str] = Counter()
    for sub in ("new", "cur"):
        try:
            entries = list(os.scandir(maildir / sub))
        except FileNotFoundError:
            continue
        for entry in entries:
            seq = _seq_of(Path(entry.path))
            if seq is not None:
                found[seq] += 1
    return found


class SeqBoxes:
    """Every file arriving in the watched Maildirs' new/, counted by box and seq."""

    def __init__(self, boxes: dict[str, Path]) -> None:
        self.seqs: dict[str, Counter[str]] = {box: Counter() for box in boxes}
        self._watch = MaildirWatch(asyncio.get_running_loop())
        for box, maildir in boxes.items():
            self._watch.add(maildir / "new", functools.partial(self._arrived, box))

    def _arrived(self, box: str, _ns: int, path: Path) -> None:
        seq = _seq_of(path)
        if seq is not None:
            self.seqs[box][seq] += 1

    @property
    def overflowed(self) -> bool:
        return self._watch.overflowed

    def close(self) -> None:
        self._watch.close()


def fresh(directory: Path) -> Path:
    """`directory`, emptied: a run never counts what an earlier run left behind."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory
