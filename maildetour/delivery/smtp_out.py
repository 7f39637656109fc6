"""Outbound SMTP delivery agent: one `Job` -> one transaction at the next hop -> an outcome per
recipient.

Internal, but it talks to remote (untrusted) SMTP servers: their replies are kept verbatim-ish
in outcomes for the operator (see `core.classify`), never sent to a sender from here; exception
texts are never copied anywhere, outcome reasons are our own words.
Contract: `deliver(job)` returns an outcome for every recipient and never raises for remote or
network trouble. Library exceptions (aiosmtplib, OSError, ssl, timeouts) become outcomes in one
function, `outcome_for_error`: refused / no route -> Unreachable; timeouts, dropped connections,
anything unknown -> TemporaryFailure; an SMTP reply -> `classify_reply`.
Behaviour: next hops from `NextHopResolver` are tried in order until one greets us (connect,
greeting, EHLO and STARTTLS form the connection phase); then one transaction: MAIL, one RCPT
per recipient (each its own outcome), DATA (its reply applies to every accepted recipient).
Connections are kept idle per host (RSET before reuse, closed after `idle_timeout` or on any
error) and at most `max_connections_per_host` are in use per host at once.
TLS: "opportunistic" uses STARTTLS when offered, unverified unless `ssl_context` is given, and
falls back to plain text once if it fails (one place: `_open`); "required" fails temporarily
without TLS; "none" never starts TLS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import re
import ssl
from typing import Literal, Mapping, get_args

import dns.exception
from aiosmtplib import SMTP, SMTPResponse
from aiosmtplib.errors import (SMTPConnectError, SMTPConnectTimeoutError, SMTPDataError,
                               SMTPHeloError, SMTPResponseException, SMTPServerDisconnected,
                               SMTPTimeoutError)

from maildetour.core.classify import classify_reply
from maildetour.core.outcome import Outcome, PermanentFailure, TemporaryFailure, Unreachable
from maildetour.delivery.base import Job
from maildetour.delivery.nexthop import DnsTemporary, HostPort, NextHopResolver, NextHops, NoHost

TlsMode = Literal["none", "opportunistic", "required"]
_TLS_MODES = get_args(TlsMode)

# An idle connection is kept this long for the next message to the same host: enough for a
# burst, well under the 300 s a server waits for a command (RFC 5321 4.5.3.2.7).
IDLE_TIMEOUT = 5.0
# QUIT on close() is a courtesy; do not let a slow server hold up shutdown.
QUIT_TIMEOUT = 2.0

_UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL,
     errno.EAFNOSUPPORT}
)
# What may go between <> on a MAIL/RCPT line: no whitespace, controls or brackets.
_WIRE_UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")


class _TlsFailed(Exception):
    """STARTTLS was wanted and did not work; the cause is chained."""


def _where(hop: HostPort) -> str:
    """Postfix style: name[address]:port."""
    name = "" if hop.name == hop.host else hop.name
    return f"{name}[{hop.host}]:{hop.port}"


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def outcome_for_error(exc: BaseException, where: str) -> Outcome:
    """The one place foreign exceptions become outcomes. Reasons are ours, never `str(exc)`."""
    cause = exc.__cause__
    match exc:
        case SMTPResponseException(code=code, message=message):
            return classify_reply(code, message)  # greeting, EHLO or STARTTLS refused
        case _TlsFailed():
            kind = type(cause).__name__ if cause is not None else "STARTTLS not offered"
            return TemporaryFailure(f"{where}: TLS failed ({kind})")
        case SMTPConnectTimeoutError():
            return TemporaryFailure(f"{where}: timed out connecting or waiting for greeting")
        case SMTPTimeoutError() | TimeoutError():
            return TemporaryFailure(f"{where}: timed out waiting for a reply")
        case SMTPConnectError() if isinstance(cause, OSError) and not isinstance(
            cause, SMTPServerDisconnected
        ):
            return outcome_for_error(cause, where)
        case SMTPConnectError() | SMTPServerDisconnected():
            return TemporaryFailure(f"{where}: connection lost")
        case ssl.SSLError() | ssl.CertificateError():
            return TemporaryFailure(f"{where}: TLS error ({type(exc).__name__})")
        case OSError() if exc.errno in _UNREACHABLE_ERRNOS:
            return Unreachable(f"{where}: {_errno_name(exc)}")
        case ConnectionRefusedError():
            return Unreachable(f"{where}: connection refused")
        case OSError():
            return TemporaryFailure(f"{where}: network error ({_errno_name(exc)})")
        case dns.exception.DNSException():
            return TemporaryFailure(f"{where}: DNS error ({type(exc).__name__})")
        case _:
            return TemporaryFailure(f"{where}: unexpected error ({type(exc).__name__})")


def _combine(failures: list[Outcome]) -> Outcome:
    """One outcome for a job no next hop took: temporary if any host may work later."""
    for kind in (TemporaryFailure, PermanentFailure):
        for failure in failures:
            if isinstance(failure, kind):
                return failure
    reasons = "; ".join(f.reason for f in failures if isinstance(f, Unreachable))
    return Unreachable(reasons or "no next hop")


def _size_limit(extensions: Mapping[str, str]) -> int | None:
    value = extensions.get("size", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _opportunistic_context() -> ssl.SSLContext:
    """Opportunistic TLS (RFC 7435): encrypt without authenticating; better than plain text."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _Session:
    """One open, greeted SMTP connection (a resource, not a value)."""

    __slots__ = ("smtp", "hop", "timer", "clean", "unchecked")

    def __init__(self, smtp: SMTP, hop: HostPort) -> None:
        self.smtp = smtp
        self.hop = hop
        self.timer: asyncio.TimerHandle | None = None
        # After a final reply to DATA the server has reset its state (RFC 5321 4.1.1.4), so
        # the next transaction needs no RSET: one round trip less per reused session.
        self.clean = False
        self.unchecked = False  # reused without RSET: a first-command disconnect is retried

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _HostPool:
    """Per next hop: the limit on sessions in use, and the idle sessions."""

    __slots__ = ("slots", "idle", "users")

    def __init__(self, limit: int) -> None:
        self.slots = asyncio.Semaphore(limit)
        self.idle: list[_Session] = []
        self.users = 0  # deliveries waiting for or holding a slot


class SmtpAgent:
    """Delivers jobs over SMTP; implements `delivery.base.Agent`."""

    def __init__(
        self,
        *,
        local_hostname: str,
        nexthop: NextHopResolver,
        connect_timeout: float = 20.0,
        command_timeout: float = 60.0,
        data_timeout: float = 120.0,
        tls: TlsMode = "opportunistic",
        max_connections_per_host: int = 10,
        ssl_context: ssl.SSLContext | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        if tls not in _TLS_MODES:
            raise ValueError(f"tls must be one of {_TLS_MODES}, not {tls!r}")
        if max_connections_per_host < 1:
            raise ValueError("max_connections_per_host must be at least 1")
        self._local_hostname = local_hostname
        self._nexthop = nexthop
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._data_timeout = data_timeout
        self._tls = tls
        self._max_per_host = max_connections_per_host
        self._idle_timeout = idle_timeout
        match tls:
            case "none":
                self._ssl_context: ssl.SSLContext | None = None
            case "opportunistic":
                self._ssl_context = ssl_context or _opportunistic_context()
            case "required":
                self._ssl_context = ssl_context or ssl.create_default_context()
        self._pools: dict[tuple[str, int, str], _HostPool] = {}
        self._closed = False

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        results: dict[str, Outcome] = {}
        for rcpt in job.recipients:
            if "@" not in rcpt or _WIRE_UNSAFE.search(rcpt):
                results[rcpt] = PermanentFailure("553 5.1.3 recipient address cannot be sent "
                                                 "by SMTP (local check)")
        pending = [r for r in job.recipients if r not in results]
        if pending and _WIRE_UNSAFE.search(job.mail_from):
            refused = PermanentFailure("553 5.1.7 sender address cannot be sent by SMTP "
                                       "(local check)")
            results.update((r, refused) for r in pending)
            pending = []
        by_domain: dict[str, list[str]] = {}
        for rcpt in pending:  # a job normally has one domain; be robust to more
            by_domain.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
        for domain, rcpts in by_domain.items():
            part = dataclasses.replace(job, recipients=tuple(dict.fromkeys(rcpts)))
            match await self._nexthop.resolve(domain):
                case NoHost(reason):  # NXDOMAIN, null MX, no MX and no A: refused for good
                    code = "556 5.1.10" if "null MX" in reason else "550 5.1.2"  # RFC 7505 3.2 / RFC 3463
                    results.update((r, PermanentFailure(f"{code} {reason}")) for r in part.recipients)
                case DnsTemporary(reason):
                    results.update((r, TemporaryFailure(reason)) for r in part.recipients)
                case NextHops(hosts):
                    await self._via(hosts, part, results)
        return {r: results[r] for r in job.recipients}

    async def close(self) -> None:
        """QUIT and close idle connections; sessions in use are closed when they finish."""
        self._closed = True
        sessions = [s for pool in self._pools.values() for s in pool.idle]
        for pool in self._pools.values():
            pool.idle.clear()
        self._pools = {k: p for k, p in self._pools.items() if p.users}
        await asyncio.gather(*(self._quit(s) for s in sessions))

    async def _via(self, hosts: tuple[HostPort, ...], job: Job,
                   results: dict[str, Outcome]) -> None:
        """Try `hosts` in order until one greets us; run the transaction there."""
        failures: list[Outcome] = []
        for hop in hosts:
            # Sessions are shared per address; with verified TLS, per name as well.
            key = (hop.host, hop.port, hop.name if self._tls == "required" else "")
            pool = self._pools.setdefault(key, _HostPool(self._max_per_host))
            pool.users += 1
            try:
                async with pool.slots:
                    match await self._checkout(pool, hop):
                        case _Session() as session:
                            await self._run(key, pool, session, job, results)
                            return
                        case failure:
                            failures.append(failure)
            finally:
                pool.users -= 1
                self._forget_if_unused(key, pool)
        outcome = _combine(failures)
        results.update((r, outcome) for r in job.recipients if r not in results)

    async def _run(self, key: tuple[str, int, str], pool: _HostPool, session: _Session, job: Job,
                   results: dict[str, Outcome]) -> None:
        reusable = False
        try:
            reusable = await self._transaction(session, job, results)
        except SMTPServerDisconnected as exc:
            if session.unchecked and not results:
                # The server closed the idle session just before we reused it: once more, on a
                # fresh connection (checked in by the inner call; this one is closed below).
                session.smtp.close()
                fresh = await self._open(session.hop)
                if isinstance(fresh, _Session):
                    await self._run(key, pool, fresh, job, results)
                else:
                    results.update((r, fresh) for r in job.recipients if r not in results)
                return
            outcome = outcome_for_error(exc, _where(session.hop))
            results.update((r, outcome) for r in job.recipients if r not in results)
        except Exception as exc:  # network trouble mid-transaction
            outcome = outcome_for_error(exc, _where(session.hop))
            results.update((r, outcome) for r in job.recipients if r not in results)
        finally:  # also on cancellation: then the session is closed, not pooled
            self._checkin(key, pool, session, reusable)

    async def _transaction(self, session: _Session, job: Job, results: dict[str, Outcome]) -> bool:
        """MAIL, RCPT each, DATA. Fills `results`; returns whether the session can be reused."""
        smtp = session.smtp
        session.clean = False
        ext = smtp.esmtp_extensions
        ascii_addresses = job.mail_from.isascii() and all(r.isascii() for r in job.recipients)
        header = job.data.partition(b"\r\n\r\n")[0]
        use_utf8 = "smtputf8" in ext and not (ascii_addresses and header.isascii())
        limit = _size_limit(ext)
        refusal: Outcome | None = None
        if not ascii_addresses and not use_utf8:
            refusal = PermanentFailure("550 5.6.7 next hop does not support SMTPUTF8 "
                                       "(local check)")
        elif limit is not None and len(job.data) > limit:
            refusal = PermanentFailure(f"552 5.3.4 message size {len(job.data)} exceeds "
                                       f"the next hop's limit {limit} (local check)")
        if refusal is not None:
            results.update((r, refusal) for r in job.recipients)
            return True
        options = [f"SIZE={len(job.data)}"] if "size" in ext else []
        if "8bitmime" in ext and not job.data.isascii():
            options.append("BODY=8BITMIME")
        if use_utf8:
            options.append("SMTPUTF8")
        encoding = "utf-8" if use_utf8 else "ascii"
        reply = await smtp.execute_command(
            b"MAIL", b"FROM:<" + job.mail_from.encode(encoding) + b">",
            *(o.encode("ascii") for o in options))
        session.unchecked = False
        if reply.code != 250:
            outcome = classify_reply(reply.code, reply.message)
            results.update((r, outcome) for r in job.recipients)
            return smtp.is_connected
        accepted: list[str] = []
        for rcpt in job.recipients:
            reply = await smtp.execute_command(b"RCPT", b"TO:<" + rcpt.encode(encoding) + b">")
            if reply.code in (250, 251):
                accepted.append(rcpt)
                continue
            results[rcpt] = classify_reply(reply.code, reply.message)
            if not smtp.is_connected:  # 421: the server closed; the rest share its reply
                results.update((r, results[rcpt]) for r in job.recipients if r not in results)
                return False
        if not accepted:
            return smtp.is_connected
        reply = await self._data(smtp, job.data)
        session.clean = reply.code != 354
        outcome = classify_reply(reply.code, reply.message)
        results.update((r, outcome) for r in accepted)
        return smtp.is_connected

    async def _data(self, smtp: SMTP, data: bytes) -> SMTPResponse:
        """DATA and the message; a refusal is a reply like any other, not an error."""
        try:
            return await smtp.data(data, timeout=self._data_timeout)
        except SMTPDataError as refused:  # aiosmtplib raises for a non-2xx/354 reply
            return SMTPResponse(refused.code, refused.message)

    async def _checkout(self, pool: _HostPool, hop: HostPort) -> _Session | Outcome:
        """An idle session that answers RSET, or a new one, or the reason there is none."""
        while pool.idle:
            session = pool.idle.pop()
            session.cancel_timer()
            if session.smtp.is_connected and session.clean:
                session.unchecked = True
                return session
            if session.smtp.is_connected:
                try:
                    await session.smtp.rset()
                    return session
                except asyncio.CancelledError:
                    session.smtp.close()
                    raise
                except Exception:  # the server dropped the idle session: open a new one
                    pass
            session.smtp.close()
        return await self._open(hop)

    async def _open(self, hop: HostPort) -> _Session | Outcome:
        """Connect; the one TLS fallback: failed opportunistic STARTTLS -> plain text, once."""
        where = _where(hop)
        try:
            return await self._connect(hop, starttls=self._tls != "none")
        except _TlsFailed as exc:
            if self._tls != "opportunistic":
                return outcome_for_error(exc, where)
        except Exception as exc:
            return outcome_for_error(exc, where)
        try:
            return await self._connect(hop, starttls=False)
        except Exception as exc:
            return outcome_for_error(exc, where)

    async def _connect(self, hop: HostPort, *, starttls: bool) -> _Session:
        smtp = SMTP(hostname=hop.host, port=hop.port, local_hostname=self._local_hostname,
                    timeout=self._command_timeout, start_tls=False, use_tls=False)
        try:
            await smtp.connect(timeout=self._connect_timeout)  # TCP and the 220 greeting
            await self._hello(smtp)
            if starttls and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(server_hostname=hop.name, tls_context=self._ssl_context,
                                        timeout=self._connect_timeout)
                    await self._hello(smtp)
                except Exception as exc:
                    raise _TlsFailed() from exc
            elif starttls and self._tls == "required":
                raise _TlsFailed()
        except BaseException:
            smtp.close()
            raise
        return _Session(smtp, hop)

    @staticmethod
    async def _hello(smtp: SMTP) -> None:
        try:
            await smtp.ehlo()
        except SMTPHeloError:
            if not smtp.is_connected:
                raise
            await smtp.helo()  # an old server without ESMTP

    def _checkin(self, key: tuple[str, int, str], pool: _HostPool, session: _Session,
                 reusable: bool) -> None:
        if self._closed or not reusable or self._idle_timeout <= 0 \
                or not session.smtp.is_connected:
            session.smtp.close()
            return
        loop = asyncio.get_running_loop()
        session.timer = loop.call_later(self._idle_timeout, self._expire, key, pool, session)
        pool.idle.append(session)

    def _expire(self, key: tuple[str, int, str], pool: _HostPool, session: _Session) -> None:
        """Timer callback: an idle session was not reused in time."""
        if session in pool.idle:
            pool.idle.remove(session)
            session.smtp.close()
            self._forget_if_unused(key, pool)

    def _forget_if_unused(self, key: tuple[str, int, str], pool: _HostPool) -> None:
        if pool.users == 0 and not pool.idle and self._pools.get(key) is pool:
            del self._pools[key]

    @staticmethod
    async def _quit(session: _Session) -> None:
        session.cancel_timer()
        try:
            await session.smtp.quit(timeout=QUIT_TIMEOUT)
        except Exception:  # a courtesy only; the connection is closed below either way
            pass
        finally:
            session.smtp.close()
