"""What a config decides, made from it: the parts `serve` starts with and a reload swaps in.

Internal. `wire(config, clock)` reads the files the config names (signing keys, the SRS
secret, certificates, the POP3 passwd_file shared with Dovecot) and makes the routing table,
the delivery agents (SMTP with the screening, SRS and signing agents in front of it; the
mailboxes' agent: local Maildir, or LMTP to the mail store with `[delivery] lmtp`; IMAP
APPEND), the redactor,
the inbound checks, the server TLS contexts and the POP3 accounts. It opens no listener and
touches no queue, so a broken config fails here (ConfigError naming the key) before anything
running is changed. `validate` is the same reading without making agents (`maildetour check`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Callable

import dns.asyncresolver
import dns.resolver

from maildetour.config import ConfigError
from maildetour.config.model import IMAP_KEEPALIVE, Config
from maildetour.core.destinations import detour_chain
from maildetour.core.passwd_file import parse_passwd_file
from maildetour.core.password import hash_problem
from maildetour.core.redact import Redactor
from maildetour.core.routing import Kind, RoutingTable
from maildetour.delivery.base import Agent
from maildetour.delivery.imap_out import ImapAgent
from maildetour.delivery.lmtp import LmtpAgent
from maildetour.delivery.local import LocalAgent
from maildetour.delivery.nexthop import NextHopResolver
from maildetour.delivery.screen import ScreeningAgent
from maildetour.delivery.signing import (
    SigningAgent,
    SigningKeys,
    SrsAgent,
    load_keys,
    load_srs,
)
from maildetour.delivery.smtp_out import SmtpAgent
from maildetour.delivery.tls_policy import MtaSts, TlsPolicies
from maildetour.inbound.handler import Checks, InboundLimits
from maildetour.pop3.server import Pop3Account
from maildetour.sign.srs import SrsCodec
from maildetour.verify.dnsfunc import DnsLookup


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


def tls_contexts(config: Config) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """The SMTP (STARTTLS) and POP3 server contexts; a file problem is a ConfigError."""
    made: list[ssl.SSLContext | None] = []
    for table, cert, tls_key in (("smtp", config.smtp.tls_cert, config.smtp.tls_key),
                                 ("pop3", config.pop3.tls_cert, config.pop3.tls_key)):
        try:
            made.append(server_tls(cert, tls_key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{table}.tls_cert", f"cannot load certificate/key: {exc}") from None
    return made[0], made[1]


def pop3_accounts(config: Config) -> dict[str, Pop3Account]:
    """The mailboxes as POP3 accounts, with their passwords from the config or, for those
    listed there, from `pop3.passwd_file` (Dovecot's format: one list for both; read now, so
    at start, on reload and by `check`). Raises ConfigError naming the key and the line."""
    shared: dict[str, str] = {}
    path = config.pop3.passwd_file
    if path is not None:
        try:
            listed = parse_passwd_file(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError("pop3.passwd_file", f"{path}: {reason}") from None
        if listed.malformed:
            raise ConfigError("pop3.passwd_file", f"{path}: line {listed.malformed[0]} is not user:password:...")
        for address, box in config.mailboxes.items():
            entry = listed.entries.get(address)
            if entry is None:
                continue
            if box.password is not None or box.password_hash is not None:
                key = "password" if box.password is not None else "password_hash"
                raise ConfigError(f'mailbox."{address}".{key}',
                                  f"also in pop3.passwd_file (line {entry.line}): keep one list")
            if entry.password and (problem := hash_problem(entry.password, clear_text=True)):
                raise ConfigError("pop3.passwd_file", f"{path}: line {entry.line} ({address}): {problem}")
            shared[address] = entry.password
    return {address: Pop3Account(address, config.mailbox_dir(address), box.password,
                                 shared.get(address) or box.password_hash)
            for address, box in config.mailboxes.items()}


def mailbox_agent(config: Config) -> Agent:
    """Who stores mailbox copies: the mail store by LMTP with `[delivery] lmtp` (several nodes),
    else our own Maildirs. Not wrapped by SRS or signing: the copy stays with us."""
    lmtp = config.delivery.lmtp
    if lmtp is not None:
        return LmtpAgent(server=lmtp, local_hostname=config.server.hostname, settings=config.delivery)
    return LocalAgent(config.mailbox_dir)


def validate(config: Config) -> None:
    """What only reading the files can tell: keys, secrets, certificates, the shared password
    file. Raises ConfigError."""
    signing_keys(config)
    srs_codec(config, create=False)
    tls_contexts(config)
    pop3_accounts(config)


@dataclass
class Wiring:
    """Everything made from one config that a reload replaces as a whole."""

    config: Config
    table: RoutingTable
    agents: dict[Kind, Agent]
    redactor: Redactor
    checks: Checks | None
    srs: SrsCodec | None
    authserv_id: str | None  # whose forged Authentication-Results inbound mail loses (None: nobody's)
    smtp_tls: ssl.SSLContext | None
    pop3_tls: ssl.SSLContext | None
    pop3_accounts: dict[str, Pop3Account]

    @property
    def limits(self) -> InboundLimits:
        return InboundLimits(self.config.smtp.max_recipients, self.config.smtp.max_received)


def wire(config: Config, clock: Callable[[], float]) -> Wiring:
    """Make every config-decided part (see the module docstring). Raises ConfigError."""
    delivery = config.delivery
    keys = signing_keys(config)
    srs = srs_codec(config, create=True)
    smtp_tls, pop3_tls = tls_contexts(config)
    table = config.routing_table()
    async_resolver, sync_resolver = make_resolvers(config)
    authserv_id = config.checks.authserv_id
    checks = Checks(authserv_id, sync_resolver, config.checks.timeout) if config.checks.inbound else None
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
    agents: dict[Kind, Agent] = {"smtp": smtp, "local": mailbox_agent(config)}
    if config.imap:
        agents["imap"] = ImapAgent(config.imap, keepalive=IMAP_KEEPALIVE)
    accounts = pop3_accounts(config)
    return Wiring(config, table, agents, Redactor(private_addresses(config)), checks, srs,
                  authserv_id if checks is not None or keys is not None else None,
                  smtp_tls, pop3_tls, accounts)
