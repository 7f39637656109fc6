"""The main process's side of the SMTP intake workers: start them, answer them, replace them.

Internal. With `[server] workers = N` > 1, `App` binds the SMTP sockets (`listeners`,
without serving them) and `IntakeWorkers` starts N - 1 `intake_worker` processes that inherit
them: the kernel keeps one queue of connections per socket, and whichever worker is free takes
the next one (a worker killed with connections waiting loses none of them: they stay queued
for the others). Each worker gets a channel (`intake_channel`); what it says is acted on here:
a message it received (a small one's bytes travel along, a larger one's are in the spool) is
committed by this process's store
(`SqliteStore.enter`, the queue's one writer), answered, and its copies go to the scheduler at
once (`Scheduler.submit`); late bounces go to `Scheduler.report`, counts to this process's
`Metrics` (the registry `/metrics` serves).

Every copy is scheduled where it is committed, so none can be committed unannounced. A worker
that ends without being asked is started again (at once, or after a pause that doubles while
they keep dying young). A reload (`replace`) starts a new set with the new config and sockets
and, once every one of them is serving, retires the old set (they close their listeners and
finish their open sessions); a new set that cannot start is stopped and the old one kept.
`stop` ends them all (SIGTERM: they finish the commits in flight, which this process still
answers) before the main process stops.
Failure: `start` raises IntakeFailed (an OSError) when a worker does not come up (its own log
line says why), OSError when it cannot be started at all. A commit that fails here is answered
"refused" (the worker says 451).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import maildetour
from maildetour.config.model import Config
from maildetour.delivery.scheduler import Scheduler
from maildetour.intake_channel import (
    MAX_LINE,
    count,
    decode,
    decode_copy,
    decode_event,
    decode_message,
    decode_new_copy,
    decode_outcome,
    encode_copy,
)
from maildetour.metrics import Metrics
from maildetour.store.base import disk_full
from maildetour.store.records import Event, Message, NewCopy
from maildetour.store.sqlite import SqliteStore, in_database

log = logging.getLogger("maildetour.intake")

START_TIMEOUT = 30.0  # a worker that is not serving by then has failed to start
STOP_TIMEOUT = 30.0  # a worker still running this long after SIGTERM is killed
_YOUNG = 10.0  # a worker that dies younger than this makes the next start wait
_LONGEST_PAUSE = 30.0



class IntakeFailed(OSError):
    """A worker did not come up (ended first, or silent for START_TIMEOUT); its own log line
    says why."""


Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


@dataclass(eq=False)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: float
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    asked_to_end: bool = False  # retired or stopped: not started again


class IntakeWorkers:
    def __init__(self, config: Config, *, scheduler: Scheduler, store: SqliteStore, metrics: Metrics,
                 spawn: Spawn, log_format: str = "plain", verbose: bool = False) -> None:
        self.config, self.scheduler, self.store, self.metrics = config, scheduler, store, metrics
        self.count = config.server.workers - 1
        self._spawn, self._log_format, self._verbose = spawn, log_format, verbose
        self._sockets: list[socket.socket] = []
        self._current: list[_Worker] = []  # the set serving the current config
        self._all: set[_Worker] = set()  # every worker process not yet reaped, retiring ones too
        self._pause = 0.0
        self._stopping = False

    # --- the set ------------------------------------------------------------------------------
    async def start(self, sockets: list[socket.socket]) -> None:
        """Start the workers on `sockets` and wait until each one serves. Raises OSError."""
        self._sockets = list(sockets)
        self._current = await self._start_set(self.config, self._sockets)

    async def replace(self, config: Config, sockets: list[socket.socket]) -> bool:
        """A reload: a new set with `config` on `sockets`; the old set retires once it serves.
        False (the old set kept, the new one stopped) when the new set could not start."""
        try:
            started = await self._start_set(config, list(sockets))
        except OSError as exc:
            log.error("reload: new SMTP intake workers did not start (%s); the old ones go on", exc)
            return False
        old, self._current = self._current, started
        self.config, self._sockets = config, list(sockets)
        for worker in old:
            self._signal(worker, signal.SIGUSR1, asked=True)
        return True

    async def stop(self) -> None:
        """Stop every worker (they finish the commits in flight), waiting up to STOP_TIMEOUT."""
        self._stopping = True
        for worker in list(self._all):
            self._signal(worker, signal.SIGTERM, asked=True)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._all and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for worker in list(self._all):
            log.error("intake worker %d (pid %d) did not stop; killing it", worker.index, worker.proc.pid)
            self._signal(worker, signal.SIGKILL, asked=True)

    def unready(self) -> str | None:
        """Why SMTP cannot be served now (/readyz): no worker serving. None: at least one is."""
        if any(w.ready.done() and not w.asked_to_end and w.proc.poll() is None for w in self._current):
            return None
        return "no SMTP intake worker is serving"

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._current]

    async def _start_set(self, config: Config, sockets: list[socket.socket]) -> list[_Worker]:
        made: list[_Worker] = []
        try:
            for index in range(1, self.count + 1):
                made.append(await self._start(index, config, sockets))
            for worker in made:
                await self._serving(worker)
        except BaseException:
            for worker in made:
                self._signal(worker, signal.SIGKILL, asked=True)
            raise
        return made

    async def _serving(self, worker: _Worker) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT)
        except TimeoutError:
            raise IntakeFailed(f"intake worker {worker.index} (pid {worker.proc.pid}) not serving after "
                          f"{START_TIMEOUT:.0f}s") from None

    async def _start(self, index: int, config: Config, sockets: list[socket.socket]) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [sys.executable, "-m", "maildetour.intake_worker", "--config", str(config.path),
                    "--index", str(index), "--parent", str(os.getpid()), "--channel", str(theirs.fileno()),
                    "--log-format", self._log_format, *(["--verbose"] if self._verbose else [])]
            for sock in sockets:
                argv += ["--listen", str(sock.fileno())]
            env = dict(os.environ)  # the same maildetour as this process, wherever it was found
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(maildetour.__file__).parent.parent),
                                                              env.get("PYTHONPATH")]))
            proc = subprocess.Popen(argv, pass_fds=[theirs.fileno(), *(s.fileno() for s in sockets)],
                                    stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_LINE)
        worker = _Worker(index, proc, reader, writer, time.monotonic())
        self._all.add(worker)
        self._spawn(self._follow(worker))
        log.info("intake worker %d started (pid %d)", index, proc.pid)
        return worker

    def _signal(self, worker: _Worker, sig: int, *, asked: bool) -> None:
        worker.asked_to_end = worker.asked_to_end or asked
        if worker.proc.poll() is None:
            try:
                os.kill(worker.proc.pid, sig)
            except ProcessLookupError:
                pass

    # --- one worker -----------------------------------------------------------------------------
    async def _follow(self, worker: _Worker) -> None:
        """Act on what `worker` says until its channel closes; then reap it, and start another
        when it was not asked to end."""
        try:
            while line := await worker.reader.readline():
                try:
                    self._hear(worker, decode(line))
                except ValueError as exc:
                    log.error("intake worker %d (pid %d) sent what we cannot read (%s); killing it",
                              worker.index, worker.proc.pid, exc)
                    self._signal(worker, signal.SIGKILL, asked=False)
                    break
        except (ConnectionError, OSError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
            log.error("intake worker %d: channel failed: %s", worker.index, exc)
            self._signal(worker, signal.SIGKILL, asked=False)
        finally:
            worker.writer.close()
        code = await asyncio.to_thread(worker.proc.wait)
        self._all.discard(worker)
        if not worker.ready.done():
            worker.ready.set_exception(IntakeFailed(f"intake worker {worker.index} (pid {worker.proc.pid}) "
                                               f"ended ({_how(code)}) before serving"))
            worker.ready.exception()  # retrieved: `_serving` may be waiting on another worker
        if worker.asked_to_end or self._stopping:
            log.info("intake worker %d (pid %d) ended (%s)", worker.index, worker.proc.pid, _how(code))
            return
        lived = time.monotonic() - worker.started
        self._pause = 0.0 if lived >= _YOUNG else min(max(self._pause * 2, 0.5), _LONGEST_PAUSE)
        log.error("intake worker %d (pid %d) ended (%s); starting another%s", worker.index, worker.proc.pid,
                  _how(code), f" in {self._pause:.1f}s" if self._pause else "")
        await asyncio.sleep(self._pause)
        if self._stopping or worker not in self._current:
            return
        try:
            replacement = await self._start(worker.index, self.config, self._sockets)
        except OSError as exc:
            log.error("intake worker %d could not be started: %s", worker.index, exc)
            return
        self._current[self._current.index(worker)] = replacement

    def _hear(self, worker: _Worker, message: list[Any]) -> None:
        match message:
            case ["ready", int()]:
                if not worker.ready.done():
                    worker.ready.set_result(None)
            case ["accept", int() as token, list() as message, list() as copies, list() as events, inline]:
                data = None if inline is None else base64.b64decode(inline)
                self._spawn(self._enter(worker, token, decode_message(message), [decode_new_copy(c) for c in copies],
                                        [decode_event(e) for e in events], data))
            case ["finish", int() as token, str() as queue_id, keep_until]:
                self._spawn(self._finish(worker, token, queue_id, keep_until))
            case ["report", copy, outcome]:
                self._spawn(self.scheduler.report(decode_copy(copy), decode_outcome(outcome)))
            case ["count", str() as name, list() as args]:
                count(self.metrics, name, args)

    async def _enter(self, worker: _Worker, token: int, message: Message, copies: list[NewCopy],
                     events: list[Event], data: bytes | None) -> None:
        """Commit what `worker` received (a small message's bytes with it, `in_database`; a larger
        one's are in the spool), answer it, and schedule the copies: the worker sends its 250
        when the answer arrives, while the delivery starts here."""
        in_db = data is not None and in_database(len(data))  # else the worker wrote the spool file
        try:
            made = await self.store.enter(message, copies, events, data if in_db else None)
        except Exception as exc:  # the worker answers 451 (and removes its file)
            log.error("%s: commit for intake worker %d failed: %s", message.queue_id, worker.index, exc)
            self._refuse(worker, token, exc)
            return
        if data is not None:
            self.store.remember(message.queue_id, data)
        self._answer(worker, "accepted", token, [encode_copy(c) for c in made])
        self.scheduler.submit(made)

    async def _finish(self, worker: _Worker, token: int, queue_id: str, keep_until: float | None) -> None:
        try:
            await self.store.finish(queue_id, keep_until)
        except Exception as exc:
            log.error("%s: finish for intake worker %d failed: %s", queue_id, worker.index, exc)
            self._refuse(worker, token, exc)
            return
        self._answer(worker, "finished", token)

    def _refuse(self, worker: _Worker, token: int, error: Exception) -> None:
        self._answer(worker, "refused", token, f"{type(error).__name__}: {error}".splitlines()[0][:200],
                     disk_full(error))

    def _answer(self, worker: _Worker, *answer: Any) -> None:
        if not worker.writer.is_closing():  # a worker gone meanwhile: its session ended without 250
            worker.writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
