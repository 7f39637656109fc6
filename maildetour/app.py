"""The one place that runs things: config in, running server out, and reloaded in place.

Internal. `build` makes the parts that live as long as the process — store (its database
upgraded to our schema first: `store.schema`), scheduler, late bounces, the retention sweeper
(`store.retention`), the SMTP session factory — around a `wiring.Wiring` (everything the config decides);
`App.run` takes the state dir's lock, binds the listeners (`listeners.Listeners`) and runs the
parts in one TaskGroup on one event loop until SIGTERM/SIGINT (or `stop()`). SIGHUP reloads
(`App.reload`: a new Wiring, listeners added and closed to match, old agents closed once their
attempts end), SIGUSR1 flushes the queue, SIGUSR2 reads it again (`maildetour queue`). systemd
hears READY/RELOADING/STOPPING (`notify`). Config, clock and resolvers are passed in; no globals.
One `metrics.Metrics` per process (a reload keeps its counts); with `[metrics] listen`, the
endpoint (`metrics_endpoint`) serves it and /healthz, /readyz once the listeners are bound, and
moves only when a reload changes `metrics.listen` (the new one bound before the old closes).
With `[server] workers` > 1 this process holds the SMTP sockets without serving them and
`intake_workers.IntakeWorkers` runs N - 1 SMTP intake processes on them: this process commits
what they receive (the queue's one writer) and schedules it at once, a reload starts a new
set, a stop ends them first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from maildetour.config import ConfigError, load_config
from maildetour.config.model import Config
from maildetour.core.hostport import HostPort
from maildetour.delivery.base import Agent
from maildetour.delivery.bounces import DsnWriter, LateBounces
from maildetour.delivery.scheduler import Scheduler
from maildetour.eventloop import running_name
from maildetour.inbound.handler import Handler
from maildetour.inbound.server import SessionFactory
from maildetour.intake_workers import IntakeWorkers
from maildetour.listeners import Listeners
from maildetour.metrics import Metrics
from maildetour.metrics_endpoint import MetricsEndpoint, start_endpoint
from maildetour.notify import notify, reloading
from maildetour.statelock import PID_FILE, hold_state_dir, wait_for_old_intake
from maildetour.store.base import Store
from maildetour.store.retention import RetentionRules, Sweeper
from maildetour.store.sqlite import SqliteStore
from maildetour.stores import AnyStore, server_store
from maildetour.wiring import Wiring, wire

log = logging.getLogger("maildetour")



@dataclass
class Parts:
    """Everything `build` made, for `App.run` to start, reload and stop."""

    wiring: Wiring
    store: AnyStore  # `stores`: SQLite in the state dir, or PostgreSQL ([store] url)
    scheduler: Scheduler
    late_bounces: LateBounces
    sessions: SessionFactory
    metrics: Metrics
    sweeper: Sweeper  # retention: the store does not grow without bound

    def configure(self, wiring: Wiring) -> Awaitable[object]:
        """Switch to `wiring` for new sessions and new attempts (a reload); returns what to
        await before the old agents may be closed."""
        config, store = wiring.config, self.store
        handler = self.sessions.handler.reconfigured(
            table=wiring.table, hostname=config.server.hostname, limits=wiring.limits,
            checks=wiring.checks, srs=wiring.srs, authserv_id=wiring.authserv_id)
        self.sessions.configure(handler, **session_settings(wiring))
        delivery = config.delivery
        keep_for = delivery.late_bounce_window if wiring.srs is not None else None
        waiting = self.scheduler.reconfigure(
            table=wiring.table, agents=wiring.agents, retry=delivery.retry,
            max_parallel=delivery.max_parallel_attempts, dsn=_dsn(wiring, store), keep_for=keep_for,
            rate_delay=delivery.destination_rate_delay, max_bytes=delivery.max_bytes_in_flight)
        self.late_bounces.hostname = config.server.hostname
        self.late_bounces.keep_for = delivery.late_bounce_window
        self.late_bounces.purge_interval = delivery.purge_interval
        self.sweeper.rules = _retention(config)
        self.metrics.configure(config.destinations)
        self.wiring = wiring
        return waiting


def _dsn(wiring: Wiring, store: Store) -> DsnWriter:
    return DsnWriter(store=store, hostname=wiring.config.server.hostname, redactor=wiring.redactor)


def session_settings(wiring: Wiring) -> dict[str, Any]:
    smtp = wiring.config.smtp
    return dict(hostname=wiring.config.server.hostname, max_sessions=smtp.max_sessions,
                max_message_size=smtp.max_message_size, command_timeout=smtp.command_timeout,
                data_timeout=smtp.data_timeout, tls=wiring.smtp_tls, max_line_length=smtp.max_line_length,
                limits=smtp)


def build(config: Config, clock: Callable[[], float]) -> Parts:
    wiring = wire(config, clock)
    delivery = config.delivery
    metrics = Metrics(config.destinations)
    store = server_store(config)  # (recovered: what was in flight is due again)
    scheduler = Scheduler(store=store, table=wiring.table, agents=wiring.agents, retry=delivery.retry,
                          max_parallel=delivery.max_parallel_attempts, dsn=_dsn(wiring, store), clock=clock,
                          rate_delay=delivery.destination_rate_delay, max_bytes=delivery.max_bytes_in_flight,
                          keep_for=delivery.late_bounce_window if wiring.srs is not None else None,
                          metrics=metrics)
    metrics.watch_queue(scheduler.queue_depth, scheduler.oldest_age)
    # Through the scheduler's table, so a reload's routing counts here too.
    late_bounces = LateBounces(store=store, hostname=config.server.hostname, report=scheduler.report,
                               left_by_smtp=lambda target: scheduler.table.kind(target) == "smtp",
                               keep_for=delivery.late_bounce_window, purge_interval=delivery.purge_interval,
                               clock=clock, metrics=metrics)
    handler = Handler(
        table=wiring.table, store=store, hostname=config.server.hostname, limits=wiring.limits,
        on_accepted=scheduler.submit, clock=clock, checks=wiring.checks,
        srs=wiring.srs, on_late_bounce=late_bounces.receive, authserv_id=wiring.authserv_id, metrics=metrics,
    )
    sessions = SessionFactory(handler, **session_settings(wiring), metrics=metrics)
    sweeper = Sweeper(store, _retention(config), clock)
    return Parts(wiring, store, scheduler, late_bounces, sessions, metrics, sweeper)


def _retention(config: Config) -> RetentionRules:
    kept = config.store
    return RetentionRules(retention=kept.retention, quarantine_retention=kept.quarantine_retention,
                          interval=kept.sweep_interval, batch=kept.purge_batch)


# Settings read once at start: a reload that changes them says so, and they wait for a restart.
_AT_RESTART = {
    "delivery.message_cache": lambda c: c.delivery.message_cache,
    "delivery.message_cache_seconds": lambda c: c.delivery.message_cache_seconds,
    "pop3.password_workers": lambda c: c.pop3.settings.password_workers,
    "pop3.io_workers": lambda c: c.pop3.settings.io_workers,
    "server.workers": lambda c: c.server.workers,
    "server.event_loop": lambda c: c.server.event_loop,
}
# How long a starting server waits for the SMTP intake workers of an earlier run (killed with
# it, a moment later) to be gone.
_OLD_INTAKE_WAIT = 10.0


@dataclass
class App:
    config: Config
    clock: Callable[[], float] = time.time
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reloads: int = 0  # reloads applied (a refused one does not count)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock)
    _parts: Parts | None = None
    _listeners: Listeners | None = None
    _tasks: asyncio.TaskGroup | None = None
    _endpoint: MetricsEndpoint | None = None  # [metrics] listen
    _intake: IntakeWorkers | None = None  # [server] workers > 1
    log_format: str = "plain"  # the SMTP intake workers log as this process does
    verbose: bool = False

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until stopped. The state dir's lock comes before anything else: a second
        server on it stops here (StateDirBusy), having touched no file, the pid file included."""
        with hold_state_dir(self.config.server.state_dir):
            wait_for_old_intake(self.config.server.state_dir, _OLD_INTAKE_WAIT)  # before `recover`
            await self._serve()

    async def _serve(self) -> None:
        parts = self._parts = build(self.config, self.clock)
        workers = self.config.server.workers
        listeners = self._listeners = Listeners(parts.sessions, parts.metrics, serve_smtp=workers == 1)
        pid_file = self.config.server.state_dir / PID_FILE
        try:
            # Listen first, outside the TaskGroup: a port in use is a one-line error, not a
            # traceback. Sessions that arrive before the writer runs simply wait for it.
            listeners.commit(await listeners.change(self.config, parts.wiring))
            try:
                self._endpoint = await self._start_endpoint(self.config.metrics.listen)
            except BaseException:
                await listeners.close()
                raise
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                background = [tasks.create_task(parts.store.run()), tasks.create_task(parts.scheduler.run())]
                if parts.scheduler.keep_for is not None:
                    background.append(tasks.create_task(parts.late_bounces.run()))
                background.append(tasks.create_task(parts.sweeper.run()))
                failed = await self._start_intake(parts, listeners, tasks)
                if failed is None:
                    self._handle_signals(parts.scheduler)
                    log.info("maildetour ready: %s", listeners.describe())
                    pid_file.write_text(f"{os.getpid()}\n")
                    notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS=serving {listeners.describe()}")
                    self.ready.set()
                else:
                    self._stop.set()
                await self._stop.wait()
                log.info("maildetour stopping")
                notify("STOPPING=1", "STATUS=stopping: finishing the messages being received")
                async with self._reloading:  # a reload half done finishes first
                    if self._intake is not None:
                        await self._intake.stop()  # they finish their sessions' commits, which we answer
                    await listeners.close()
                    await parts.sessions.handler.drain()  # a message being committed still is
                for task in background:
                    task.cancel()
            if failed is not None:
                raise failed
        finally:
            self._tasks = None
            if self._endpoint is not None:
                self._endpoint.close()
            pid_file.unlink(missing_ok=True)
            await asyncio.gather(*(agent.close() for agent in parts.wiring.agents.values()))
            parts.store.close()

    async def _start_intake(self, parts: Parts, listeners: Listeners, tasks: asyncio.TaskGroup) -> OSError | None:
        """With `[server] workers` > 1, start the SMTP intake workers on the held sockets and
        wait until they serve; the error (one line for the command line) when they do not."""
        workers = self.config.server.workers
        if workers > 1 and isinstance(parts.store, SqliteStore):  # (PostgreSQL: one process a node)
            intake = self._intake = IntakeWorkers(
                self.config, scheduler=parts.scheduler, store=parts.store, metrics=parts.metrics,
                spawn=tasks.create_task, log_format=self.log_format, verbose=self.verbose)
            try:
                await intake.start(listeners.smtp_sockets())
            except OSError as exc:
                return exc
        log.info("event loop %s; %s", running_name(),
                 f"SMTP received by {workers - 1} intake workers (pids {' '.join(map(str, self._intake.pids()))})"
                 if self._intake is not None else "one process")
        return None

    async def reload(self) -> bool:
        """SIGHUP (`maildetour reload`): read the config file again and switch to it for new
        sessions and new attempts; nothing in flight is dropped. A config that cannot be
        used (bad value, unreadable key, port in use, another state dir) leaves the running
        one in place and is logged as one line naming the key. The audit log is reopened
        either way (log rotation). True when the new config was applied."""
        parts, listeners = self._parts, self._listeners
        if parts is None or listeners is None or self._stop.is_set():
            return False
        async with self._reloading:
            reloading("reloading the config")
            try:
                parts.store.reopen_audit_log()
            except OSError as exc:  # e.g. logrotate made the new file with another owner
                log.error("audit log not reopened, still writing the old file: %s", exc)
            try:
                config = load_config(self.config.path)
                if config.server.state_dir != self.config.server.state_dir:
                    raise ConfigError("server.state_dir", "cannot change while running; restart to move it")
                wiring = wire(config, self.clock)
                try:
                    change = await listeners.change(config, wiring)
                    try:
                        endpoint = self._endpoint if config.metrics.listen == self.config.metrics.listen \
                            else await self._start_endpoint(config.metrics.listen)
                    except BaseException:
                        await listeners.roll_back(change)
                        raise
                except BaseException:
                    await asyncio.gather(*(agent.close() for agent in wiring.agents.values()))
                    raise
            except (ConfigError, OSError) as exc:
                log.error("reload refused, still serving the old config: %s", exc)
                notify("READY=1", "STATUS=reload refused; serving the old config")
                return False
            for key, value in _AT_RESTART.items():
                if value(config) != value(self.config):
                    log.warning("reload: %s changed; it takes effect at the next restart", key)
            old_agents = parts.wiring.agents.values()
            in_flight = parts.configure(wiring)
            if listeners.pop3 is not None:
                listeners.pop3.configure(accounts=wiring.pop3_accounts, settings=config.pop3.settings,
                                         ssl_context=wiring.pop3_tls, hostname=config.server.hostname)
            listeners.commit(change)
            if self._intake is not None:  # new workers with the new config; the old ones retire
                await self._intake.replace(config, listeners.smtp_sockets())
            if endpoint is not self._endpoint:
                if self._endpoint is not None:
                    self._endpoint.close()
                self._endpoint = endpoint
            self.config = config
            self.reloads += 1
            if self._tasks is not None:
                self._tasks.create_task(_close_after(in_flight, list(old_agents)))
            log.info("config reloaded from %s: %s", config.path, listeners.describe())
            notify("READY=1", f"STATUS=serving {listeners.describe()}")
            return True

    async def _start_endpoint(self, where: HostPort | None) -> MetricsEndpoint | None:
        """The metrics endpoint on `where` (None: none). A bind failure is a ConfigError."""
        if where is None or self._parts is None:
            return None
        try:
            endpoint = await start_endpoint(self._parts.metrics, self._unready, where.host, where.port)
        except OSError as exc:
            raise ConfigError("metrics.listen", f"cannot listen on {where}: {exc.strerror or exc}") from None
        log.info("metrics on http://%s/metrics", where)
        return endpoint

    def _unready(self) -> str | None:
        """Why /readyz answers 503: starting or stopping, a store that cannot write, or a
        configured listener that is not bound. None: ready."""
        parts, listeners = self._parts, self._listeners
        if parts is None or listeners is None or not self.ready.is_set():
            return "starting"
        if self._stop.is_set():
            return "stopping"
        intake = self._intake.unready() if self._intake is not None else None
        return parts.store.health() or _unbound(self.config, listeners) or intake

    def _handle_signals(self, scheduler: Scheduler) -> None:
        loop = asyncio.get_running_loop()
        handlers = {signal.SIGTERM: self.stop, signal.SIGINT: self.stop, signal.SIGHUP: self._reload_soon,
                    signal.SIGUSR1: scheduler.flush, signal.SIGUSR2: scheduler.reload}
        for sig, handler in handlers.items():
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread (tests run the app in a thread)

    def _reload_soon(self) -> None:
        if self._tasks is not None:
            self._tasks.create_task(self.reload())


def _unbound(config: Config, listeners: Listeners) -> str | None:
    """The first listener `config` names that is not serving, if any."""
    for hp in config.smtp.listen:
        server = listeners.smtp.get(hp)
        if server is None or not server.is_serving():
            return f"smtp.listen {hp} is not bound"
    pop3 = listeners.pop3
    wanted = [("pop3.listen", hp, False) for hp in config.pop3.listen]
    wanted += [("pop3.listen_tls", hp, True) for hp in config.pop3.listen_tls]
    for key, hp, tls in wanted:
        if pop3 is None or (hp.host, hp.port, tls) not in pop3.listening:
            return f"{key} {hp} is not bound"
    if pop3 is not None and not all(server.is_serving() for server in pop3.servers):
        return "a pop3 listener is not serving"
    return None


async def _close_after(in_flight: Awaitable[object], agents: list[Agent]) -> None:
    """Close a reload's old agents once the attempts that were using them are over."""
    await in_flight
    await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)
