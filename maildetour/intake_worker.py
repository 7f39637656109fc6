"""An SMTP intake worker: a process that only receives mail, beside the main process.

Faces the internet (it runs the SMTP sessions). With `[server] workers = N` > 1 the main
process (`app`, `intake_workers`) binds the SMTP sockets and starts N - 1 of these with
`python -m maildetour.intake_worker`; each inherits the sockets and one end of its channel
(`intake_channel`), reads the same config file, and accepts from the sockets' shared queue:
the same sessions, checks and handler as a single process (`inbound`). Its store
(`intake_store.RelayedStore`) writes each message's bytes to the spool (fsync'ed, on this
core) and has the main process commit the rows (the queue database's one writer), which
schedules the copies at that moment; the 250 follows the main process's answer. Its counts
and late bounces go the same way. It never delivers, never writes the queue database and
never runs the retention sweep, so each copy is attempted by the main process alone.

Contract: 250 only after the main process committed (as in one process). It starts only under a
living main process (PR_SET_PDEATHSIG: it is killed when the main process dies, in any way,
kill -9 included) and holds the state dir's intake lock shared while it may write, so a new
main process never clears a spool file a worker is still committing. Signals: SIGTERM stops
it (listeners closed, commits in flight finished, sessions cut like the main process's
at stop); SIGUSR1 retires it (a reload: listeners closed, open sessions finish, then it
stops); SIGHUP, SIGINT and SIGUSR2 are ignored (the main process's: it starts new workers on a
reload, and stops them when it stops). Failure: a config
or store error at start is one log line and exit 1; the main process starts another.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from maildetour import eventloop, logs, malloc
from maildetour.app import session_settings
from maildetour.config import ConfigError, load_config
from maildetour.config.model import Config
from maildetour.delivery.bounces import LateBounces
from maildetour.inbound.handler import Handler
from maildetour.inbound.server import SessionFactory
from maildetour.intake_channel import MAX_LINE, Channel, RelayedMetrics
from maildetour.intake_store import RelayedStore
from maildetour.statelock import share_intake_lock
from maildetour.store.records import Copy
from maildetour.wiring import wire

log = logging.getLogger("maildetour.intake")

_PR_SET_PDEATHSIG = 1
_RETIRE_POLL = 0.1  # seconds between looks at the open sessions of a retiring worker


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the main process ends; exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the closed channel still stops the worker
    if os.getppid() != parent:
        os._exit(1)


async def serve(config: Config, channel: int, listening: list[int], clock: Callable[[], float] = time.time) -> None:
    loop = asyncio.get_running_loop()
    wiring = wire(config, clock)
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=channel), limit=MAX_LINE)
    delivery = config.delivery
    to_main = Channel(writer)
    # The worker writes its messages' bytes to the spool; the main process commits the rows
    # (the queue's one writer) and delivers (`intake_store`).
    store = RelayedStore(config.queue_db, config.spool_dir, config.audit_log, to_main)
    metrics = RelayedMetrics(to_main)
    metrics.configure(config.destinations)
    late = LateBounces(store=store, hostname=config.server.hostname, report=to_main.report,
                       left_by_smtp=lambda target: wiring.table.kind(target) == "smtp",
                       keep_for=delivery.late_bounce_window, purge_interval=delivery.purge_interval,
                       clock=clock, metrics=metrics)
    handler = Handler(table=wiring.table, store=store, hostname=config.server.hostname, limits=wiring.limits,
                      on_accepted=_scheduled_by_main, clock=clock, checks=wiring.checks, srs=wiring.srs,
                      on_late_bounce=late.receive, authserv_id=wiring.authserv_id, metrics=metrics)
    sessions = SessionFactory(handler, **session_settings(wiring), metrics=metrics)
    stop, retire = asyncio.Event(), asyncio.Event()
    # SIGINT too is the main process's business (a terminal's Ctrl-C reaches the whole group).
    handlers = {signal.SIGTERM: stop.set, signal.SIGUSR1: retire.set, signal.SIGINT: _ignored,
                signal.SIGHUP: _ignored, signal.SIGUSR2: _ignored}
    for sig, handle in handlers.items():
        loop.add_signal_handler(sig, handle)
    try:
        async with asyncio.TaskGroup() as tasks:
            servers = [await loop.create_server(sessions, sock=socket.socket(fileno=fd)) for fd in listening]
            listening_to_main = tasks.create_task(_until_closed(to_main, reader, stop))
            retiring = tasks.create_task(_retire(retire, servers, sessions, stop))
            to_main.ready(os.getpid())
            log.info("intake worker serving (pid %d, %s loop)", os.getpid(), eventloop.running_name())
            await stop.wait()
            for server in servers:
                server.close()
            await handler.drain()  # a message being committed still is (the main process answers)
            await to_main.drain()
            for task in (listening_to_main, retiring):
                task.cancel()
    finally:
        await asyncio.gather(*(agent.close() for agent in wiring.agents.values()), return_exceptions=True)
        store.close()
        writer.close()


def _scheduled_by_main(copies: list[Copy]) -> None:
    """The handler's `on_accepted`: nothing to do, the main process scheduled them at its commit."""


def _ignored() -> None:
    pass


async def _until_closed(to_main: Channel, reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
    """Take the main process's answers; when it closes its end (it is gone or stopping): stop."""
    await to_main.listen(reader)
    log.warning("the main process closed the channel; stopping")
    stop.set()


async def _retire(retire: asyncio.Event, servers: Sequence[asyncio.AbstractServer], sessions: SessionFactory,
                  stop: asyncio.Event) -> None:
    """A reload: take no new connection, let the open sessions end (each by its own timeouts), stop."""
    await retire.wait()
    for server in servers:
        server.close()
    while sessions.open > 0:
        await asyncio.sleep(_RETIRE_POLL)
    stop.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maildetour.intake_worker",
                                     description="an SMTP intake worker (started by `maildetour serve`)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--listen", type=int, action="append", default=[])
    parser.add_argument("--log-format", choices=("plain", "json"), default="plain")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    logs.setup(logging.DEBUG if args.verbose else logging.INFO, args.log_format, process=f"intake{args.index}")
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # as `serve` does: message buffers go back
        malloc.return_large_buffers()
    try:
        config = load_config(Path(args.config))
        share_intake_lock(config.server.state_dir)
        eventloop.run(serve(config, args.channel, args.listen), config.server.event_loop)
    except (ConfigError, OSError) as exc:
        log.error("intake worker stopped: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
