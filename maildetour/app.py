"""The one place that wires things: config in, running server out.

Internal. Builds the store, routing table, redactor, delivery agents, scheduler, SMTP and POP3
listeners, and runs them in one TaskGroup on one event loop until SIGTERM/SIGINT (or until
`stop()` is called). Passes config, clock and resolver in; no globals.
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

from maildetour.config.model import Config
from maildetour.core.redact import Redactor
from maildetour.core.routing import RoutingTable
from maildetour.delivery.local import LocalAgent
from maildetour.delivery.nexthop import NextHopResolver
from maildetour.delivery.scheduler import Scheduler
from maildetour.delivery.smtp_out import SmtpAgent
from maildetour.delivery.outgoing import Outgoing
from maildetour.inbound.handler import Checks, Handler, InboundLimits
from maildetour.inbound.server import SessionFactory, start_smtp
from maildetour.pop3.server import Pop3Account, Pop3Server, start_pop3
from maildetour.pop3.settings import Pop3Settings
from maildetour.sign.dnsfunc import DnsLookup
from maildetour.store.sqlite import SqliteStore

log = logging.getLogger("maildetour")

# In state_dir while `serve` runs: how `maildetour queue --flush` finds the server (SIGUSR1).
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
    """Every forward target and configured destination: none of them may reach a sender."""
    found: set[str] = set(config.destinations)
    for rule in config.forwards:
        found.update(rule.to)
    for dest in config.destinations.values():
        if dest.detour:
            found.add(dest.detour)
    return frozenset(found)


def server_tls(cert: object, key: object) -> ssl.SSLContext | None:
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


def validate(config: Config) -> None:
    """What only reading the files can tell: keys, secrets, certificates. Raises ConfigError."""
    from maildetour.config import ConfigError

    if config.signing is not None:
        signing = config.signing
        try:
            Outgoing.from_config(signing, authserv_id=config.checks.authserv_id,
                                 dnsfunc=DnsLookup(dns.resolver.Resolver(configure=False)), clock=time.time)
        except OSError as exc:
            which = "srs_secret_file" if exc.filename == str(signing.srs_secret_file) else "dkim_key"
            raise ConfigError(f"signing.{which}", f"{exc.filename}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError("signing", str(exc)) from None
    for table, cert, tls_key in (("smtp", config.smtp.tls_cert, config.smtp.tls_key),
                                 ("pop3", config.pop3.tls_cert, config.pop3.tls_key)):
        try:
            server_tls(cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{table}.tls_cert", f"cannot load certificate/key: {exc}") from None


T = TypeVar("T")


async def _listen(config: Config, key: str, where: object, starting: Awaitable[T]) -> T:
    """Await a listener's start; a bind failure becomes a ConfigError naming the key."""
    from maildetour.config import ConfigError

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
        config = self.config
        config.server.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        table = RoutingTable.from_config(config)
        async_resolver, sync_resolver = make_resolvers(config)
        authserv_id = config.checks.authserv_id
        outgoing = None if config.signing is None else Outgoing.from_config(
            config.signing, authserv_id=authserv_id, dnsfunc=DnsLookup(sync_resolver), clock=self.clock)
        checks = Checks(authserv_id, sync_resolver, config.checks.timeout) if config.checks.inbound else None
        store = SqliteStore(config.queue_db, config.spool_dir, config.audit_log)
        smtp_agent = SmtpAgent(
            local_hostname=config.server.hostname,
            nexthop=NextHopResolver(async_resolver, relay={
                domain: (hp.host, hp.port) for domain, hp in config.delivery.relay.items()},
                port=config.delivery.smtp_port),
            connect_timeout=config.delivery.connect_timeout,
            command_timeout=config.delivery.command_timeout,
            data_timeout=config.delivery.data_timeout,
            tls=config.delivery.tls,  # type: ignore[arg-type]
            max_connections_per_host=config.delivery.max_connections_per_host,
        )
        scheduler = Scheduler(
            store=store, table=table, agents={"smtp": smtp_agent, "local": LocalAgent(config.mailbox_dir)},
            delivery=config.delivery, hostname=config.server.hostname,
            redactor=Redactor(private_addresses(config)), clock=self.clock,
            outgoing=outgoing, authserv_id=authserv_id if checks is not None else None,
        )
        handler = Handler(
            table=table, store=store, hostname=config.server.hostname,
            limits=InboundLimits(config.smtp.max_recipients, config.smtp.max_received),
            on_accepted=scheduler.submit, clock=self.clock, checks=checks,
            srs=outgoing.srs if outgoing is not None else None, on_late_bounce=scheduler.late_bounce,
            authserv_id=authserv_id if outgoing is not None else None,
        )
        factory = SessionFactory(
            handler, hostname=config.server.hostname, max_sessions=config.smtp.max_sessions,
            max_message_size=config.smtp.max_message_size, command_timeout=config.smtp.command_timeout,
            data_timeout=config.smtp.data_timeout, tls=server_tls(config.smtp.tls_cert, config.smtp.tls_key),
            max_line_length=config.smtp.max_line_length,
        )
        loop = asyncio.get_running_loop()
        handlers = {signal.SIGTERM: self.stop, signal.SIGINT: self.stop, signal.SIGUSR1: scheduler.flush}
        for sig, handler_func in handlers.items():
            try:
                loop.add_signal_handler(sig, handler_func)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread (tests run the app in a thread)
        pid_file = config.server.state_dir / PID_FILE
        try:
            # Listen first, outside the TaskGroup: a port in use is a one-line error, not a
            # traceback. Sessions that arrive before the writer runs simply wait for it.
            smtp_servers = [await _listen(config, "smtp.listen", hp, start_smtp(factory, hp.host, hp.port))
                            for hp in config.smtp.listen]
            pop3 = await self._start_pop3()
            async with asyncio.TaskGroup() as tasks:
                background = [tasks.create_task(store.run()), tasks.create_task(scheduler.run())]
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
                for task in background:
                    task.cancel()
        finally:
            pid_file.unlink(missing_ok=True)
            await smtp_agent.close()
            store.close()

    async def _start_pop3(self) -> Pop3Server | None:
        pop = self.config.pop3
        if not pop.listen and not pop.listen_tls:
            return None
        accounts = {
            address: Pop3Account(address, self.config.mailbox_dir(address), box.password, box.password_hash)
            for address, box in self.config.mailboxes.items()
        }
        return await _listen(self.config, "pop3.listen", None, start_pop3(
            listen=[(hp.host, hp.port) for hp in pop.listen],
            listen_tls=[(hp.host, hp.port) for hp in pop.listen_tls],
            accounts=accounts, ssl_context=server_tls(pop.tls_cert, pop.tls_key),
            settings=Pop3Settings(allow_insecure_login=pop.allow_plaintext),
            hostname=self.config.server.hostname,
        ))
