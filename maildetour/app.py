"""The one place that wires things: config in, running server out.

Internal. `build` makes every part from the config — store, routing table, redactor, delivery
agents (SMTP with the screening, SRS and signing agents in front of it; local Maildir; IMAP
APPEND), scheduler, bounces, the SMTP session factory — and `App.run` starts the listeners and
runs the parts in one TaskGroup on one event loop until SIGTERM/SIGINT (or `stop()`). SIGUSR1
flushes the queue, SIGUSR2 reads it again (`maildetour queue`). Config, clock and resolvers
are passed in; no globals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import dns.asyncresolver
import dns.resolver

from maildetour.config import ConfigError
from maildetour.config.model import IMAP_KEEPALIVE, Config
from maildetour.core.destinations import detour_chain
from maildetour.core.redact import Redactor
from maildetour.core.routing import Kind
from maildetour.delivery.base import Agent
from maildetour.delivery.bounces import DsnWriter, LateBounces
from maildetour.delivery.imap_out import ImapAgent
from maildetour.delivery.local import LocalAgent
from maildetour.delivery.nexthop import NextHopResolver
from maildetour.delivery.scheduler import Scheduler
from maildetour.delivery.screen import ScreeningAgent
from maildetour.delivery.signing import SigningAgent, SigningKeys, SrsAgent, load_keys, load_srs
from maildetour.delivery.smtp_out import SmtpAgent
from maildetour.delivery.tls_policy import MtaSts, TlsPolicies
from maildetour.inbound.handler import Checks, Handler, InboundLimits
from maildetour.inbound.server import SessionFactory, start_smtp
from maildetour.pop3.server import Pop3Account, Pop3Server, start_pop3
from maildetour.sign.srs import SrsCodec
from maildetour.statelock import hold_state_dir
from maildetour.store.sqlite import SqliteStore
from maildetour.verify.dnsfunc import DnsLookup

log = logging.getLogger("maildetour")

# In state_dir while `serve` runs: how `maildetour queue` finds the server (SIGUSR1/SIGUSR2).
PID_FILE = "maildetour.pid"


def make_resolvers(config: Config) -> tuple[dns.asyncresolver.Resolver, dns.resolver.Resolver]:
    """The configured DNS servers, or the system's when none are configured: an async resolver
    for delivery, a blocking one for the checks and ARC (which run in threads)."""
    servers = config.delivery.dns_servers
    if not servers:
        return dns.asyncresolver.Resolver(), dns.resolver.Resolver()
    pair = dns.asyncresolver.Resolver(configure=False), dns.resolver.Resolver(configure=False)
    for resolver in pair:
        resolver.nameservers = [s.host for s in servers]
        resolver.nameserver_ports = {s.host: s.port for s in servers}
        resolver.lifetime = 10.0
        resolver.cache = dns.resolver.Cache()
    return pair


def private_addresses(config: Config) -> frozenset[str]:
    """Every forward target and configured destination, every step of their detour chains and
    every IMAP account's user name: none of them may reach a sender."""
    starts = set(config.destinations) | {target for rule in config.forwards for target in rule.to}
    steps = {step for start in starts for step in detour_chain(config.destinations, start).targets}
    return frozenset({step for step in steps if "@" in step} | {account.user for account in config.imap.values()})


def server_tls(cert: object, key: object) -> ssl.SSLContext | None:
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


def signing_keys(config: Config) -> SigningKeys | None:
    """The [signing] key files read; a problem with them is a ConfigError naming the key."""
    signing = config.signing
    if signing is None:
        return None
    try:
        return load_keys(signing)
    except OSError as exc:
        which = "ed25519_key" if exc.filename == str(signing.ed25519_key) else "dkim_key"
        raise ConfigError(f"signing.{which}", f"{exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError("signing", str(exc)) from None


def srs_codec(config: Config, *, create: bool) -> SrsCodec | None:
    """The SRS codec; with `create`, a secret of our own is made if it is missing (the first
    start). Without, a missing secret of our own is fine (the server will make it) and None is
    returned. A configured secret file that is missing or empty is a ConfigError."""
    if config.srs is None or (not create and config.srs.made_here and not config.srs.secret_file.exists()):
        return None
    try:
        return load_srs(config.srs, create=create)
    except (OSError, ValueError) as exc:
        raise ConfigError("srs.secret_file", str(exc)) from None


def validate(config: Config) -> None:
    """What only reading the files can tell: keys, secrets, certificates. Raises ConfigError."""
    signing_keys(config)
    srs_codec(config, create=False)
    for table, cert, tls_key in (("smtp", config.smtp.tls_cert, config.smtp.tls_key),
                                 ("pop3", config.pop3.tls_cert, config.pop3.tls_key)):
        try:
            server_tls(cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{table}.tls_cert", f"cannot load certificate/key: {exc}") from None


@dataclass
class Parts:
    """Everything `build` made, for `App.run` to start and stop."""

    store: SqliteStore
    agents: dict[Kind, Agent]
    scheduler: Scheduler
    late_bounces: LateBounces
    sessions: SessionFactory


def build(config: Config, clock: Callable[[], float]) -> Parts:
    config.server.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    delivery = config.delivery
    table = config.routing_table()
    async_resolver, sync_resolver = make_resolvers(config)
    authserv_id = config.checks.authserv_id
    keys = signing_keys(config)
    srs = srs_codec(config, create=True)
    checks = Checks(authserv_id, sync_resolver, config.checks.timeout) if config.checks.inbound else None
    store = SqliteStore(config.queue_db, config.spool_dir, config.audit_log,
                        cache_bytes=delivery.message_cache, cache_seconds=delivery.message_cache_seconds)
    store.recover()
    verify_context = ssl.create_default_context(cafile=str(delivery.tls_ca_file) if delivery.tls_ca_file else None)
    sts = MtaSts(async_resolver, context=verify_context, port=delivery.mta_sts_port,
                 timeout=delivery.connect_timeout, clock=clock) if delivery.mta_sts else None
    policies = TlsPolicies(default=delivery.tls, per_domain=delivery.tls_policy,
                           per_address={a: d.tls for a, d in table.destinations.items()}, sts=sts)
    smtp: Agent = SmtpAgent(
        local_hostname=config.server.hostname,
        nexthop=NextHopResolver(async_resolver, relay=delivery.relay, port=delivery.smtp_port),
        settings=delivery, policies=policies, verify_context=verify_context)
    if keys is not None:
        smtp = SigningAgent(smtp, keys=keys, authserv_id=authserv_id, clock=clock,
                            dnsfunc=DnsLookup(sync_resolver, timeout=config.checks.timeout))
    if srs is not None:
        smtp = SrsAgent(smtp, srs=srs, clock=clock)
    if checks is not None and any(d.skip_when for d in config.destinations.values()):
        smtp = ScreeningAgent(smtp, destinations=table.destinations, authserv_id=authserv_id)
    agents: dict[Kind, Agent] = {"smtp": smtp, "local": LocalAgent(config.mailbox_dir)}
    if config.imap:
        agents["imap"] = ImapAgent(config.imap, keepalive=IMAP_KEEPALIVE)
    dsn = DsnWriter(store=store, hostname=config.server.hostname, redactor=Redactor(private_addresses(config)))
    scheduler = Scheduler(store=store, table=table, agents=agents, retry=delivery.retry,
                          max_parallel=delivery.max_parallel_attempts, dsn=dsn, clock=clock,
                          rate_delay=delivery.destination_rate_delay, max_bytes=delivery.max_bytes_in_flight,
                          keep_for=delivery.late_bounce_window if srs is not None else None)
    late_bounces = LateBounces(store=store, hostname=config.server.hostname, report=scheduler.report,
                               left_by_smtp=lambda target: table.kind(target) == "smtp",
                               keep_for=delivery.late_bounce_window, purge_interval=delivery.purge_interval,
                               clock=clock)
    handler = Handler(
        table=table, store=store, hostname=config.server.hostname,
        limits=InboundLimits(config.smtp.max_recipients, config.smtp.max_received),
        on_accepted=scheduler.submit, clock=clock, checks=checks,
        srs=srs, on_late_bounce=late_bounces.receive,
        authserv_id=authserv_id if keys is not None else None,
    )
    sessions = SessionFactory(
        handler, hostname=config.server.hostname, max_sessions=config.smtp.max_sessions,
        max_message_size=config.smtp.max_message_size, command_timeout=config.smtp.command_timeout,
        data_timeout=config.smtp.data_timeout, tls=server_tls(config.smtp.tls_cert, config.smtp.tls_key),
        max_line_length=config.smtp.max_line_length, limits=config.smtp,
    )
    return Parts(store, agents, scheduler, late_bounces, sessions)


T = TypeVar("T")


async def _listen(key: str, where: object, starting: Awaitable[T]) -> T:
    """Await a listener's start; a bind failure becomes a ConfigError naming the key."""
    try:
        return await starting
    except OSError as exc:
        place = f" {where}" if where is not None else ""
        raise ConfigError(key, f"cannot listen on{place}: {exc.strerror or exc}") from None


@dataclass
class App:
    config: Config
    clock: Callable[[], float] = time.time
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until stopped. The state dir's lock comes before anything else: a second
        server on it stops here (StateDirBusy), having touched no file, the pid file included."""
        with hold_state_dir(self.config.server.state_dir):
            await self._serve()

    async def _serve(self) -> None:
        config = self.config
        parts = build(config, self.clock)
        self._handle_signals(parts.scheduler)
        pid_file = config.server.state_dir / PID_FILE
        try:
            # Listen first, outside the TaskGroup: a port in use is a one-line error, not a
            # traceback. Sessions that arrive before the writer runs simply wait for it.
            smtp_servers = [await _listen("smtp.listen", hp, start_smtp(parts.sessions, hp.host, hp.port))
                            for hp in config.smtp.listen]
            pop3 = await self._start_pop3()
            async with asyncio.TaskGroup() as tasks:
                background = [tasks.create_task(parts.store.run()), tasks.create_task(parts.scheduler.run())]
                if parts.scheduler.keep_for is not None:
                    background.append(tasks.create_task(parts.late_bounces.run()))
                log.info("maildetour ready: smtp %s%s", ", ".join(map(str, config.smtp.listen)),
                         f"; pop3 {', '.join(map(str, config.pop3.listen + config.pop3.listen_tls))}"
                         if pop3 else "")
                pid_file.write_text(f"{os.getpid()}\n")
                self.ready.set()
                await self._stop.wait()
                log.info("maildetour stopping")
                for server in smtp_servers:
                    server.close()
                if pop3 is not None:
                    pop3.close()
                    await pop3.wait_closed()
                await parts.sessions.handler.drain()  # a message being committed still is
                for task in background:
                    task.cancel()
        finally:
            pid_file.unlink(missing_ok=True)
            await asyncio.gather(*(agent.close() for agent in parts.agents.values()))
            parts.store.close()

    def _handle_signals(self, scheduler: Scheduler) -> None:
        loop = asyncio.get_running_loop()
        handlers = {signal.SIGTERM: self.stop, signal.SIGINT: self.stop,
                    signal.SIGUSR1: scheduler.flush, signal.SIGUSR2: scheduler.reload}
        for sig, handler in handlers.items():
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread (tests run the app in a thread)

    async def _start_pop3(self) -> Pop3Server | None:
        pop = self.config.pop3
        if not pop.listen and not pop.listen_tls:
            return None
        accounts = {
            address: Pop3Account(address, self.config.mailbox_dir(address), box.password, box.password_hash)
            for address, box in self.config.mailboxes.items()
        }
        return await _listen("pop3.listen", None, start_pop3(
            listen=[(hp.host, hp.port) for hp in pop.listen],
            listen_tls=[(hp.host, hp.port) for hp in pop.listen_tls],
            accounts=accounts, ssl_context=server_tls(pop.tls_cert, pop.tls_key),
            settings=pop.settings, hostname=self.config.server.hostname,
        ))
