"""Outbound SMTP connections: open, greet, STARTTLS, keep idle for reuse, limit per host.

Internal; talks to remote (untrusted) servers. `SmtpPool.slot(hop)` holds one of the host's
`max_per_host` slots for one transaction; inside it `checkout` hands out an idle session of
that host (without RSET when its last transaction ended with a final reply to DATA, else
after a RSET that worked) or opens a new one, and `checkin` keeps a reusable session idle for
`idle_timeout` (closed then, or on any error, or on `close()`).
TLS: "opportunistic" uses STARTTLS when offered, unverified unless `ssl_context` is given, and
falls back to plain text once if it fails (one place: `_open`); "required" fails temporarily
without TLS; "none" never starts TLS. Failure: never raises for remote or network trouble;
`checkout`/`open` return an `Outcome` instead of a session (`smtp_errors`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal, get_args

from aiosmtplib import SMTP
from aiosmtplib.errors import SMTPHeloError

from maildetour.core.hostport import HostPort
from maildetour.core.outcome import Outcome
from maildetour.delivery.smtp_errors import TlsFailed, outcome_for_error, where

TlsMode = Literal["none", "opportunistic", "required"]
TLS_MODES = get_args(TlsMode)

# QUIT on close() is a courtesy; do not let a slow server hold up shutdown.
QUIT_TIMEOUT = 2.0

_Key = tuple[str, int, str]


class Session:
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
        self.idle: list[Session] = []
        self.users = 0  # deliveries waiting for or holding a slot


def _opportunistic_context() -> ssl.SSLContext:
    """Opportunistic TLS (RFC 7435): encrypt without authenticating; better than plain text."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Lease:
    """One slot at one host, held for one transaction."""

    __slots__ = ("_owner", "_key", "_pool", "hop")

    def __init__(self, owner: SmtpPool, key: _Key, pool: _HostPool, hop: HostPort) -> None:
        self._owner, self._key, self._pool, self.hop = owner, key, pool, hop

    async def checkout(self) -> Session | Outcome:
        """An idle session that is clean or answers RSET, or a new one, or why there is none."""
        pool = self._pool
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
        return await self.open()

    async def open(self) -> Session | Outcome:
        return await self._owner.open(self.hop)

    def checkin(self, session: Session, reusable: bool) -> None:
        self._owner.checkin(self._key, self._pool, session, reusable)


class SmtpPool:
    def __init__(self, *, local_hostname: str, tls: TlsMode, ssl_context: ssl.SSLContext | None,
                 connect_timeout: float, command_timeout: float, idle_timeout: float,
                 max_per_host: int) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
        if max_per_host < 1:
            raise ValueError("max_connections_per_host must be at least 1")
        self._local_hostname = local_hostname
        self._tls = tls
        match tls:
            case "none":
                self._ssl_context: ssl.SSLContext | None = None
            case "opportunistic":
                self._ssl_context = ssl_context or _opportunistic_context()
            case "required":
                self._ssl_context = ssl_context or ssl.create_default_context()
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._idle_timeout = idle_timeout
        self._max_per_host = max_per_host
        self._pools: dict[_Key, _HostPool] = {}
        self._closed = False

    @asynccontextmanager
    async def slot(self, hop: HostPort) -> AsyncIterator[Lease]:
        # Sessions are shared per address; with verified TLS, per name as well.
        key = (hop.host, hop.port, hop.name if self._tls == "required" else "")
        pool = self._pools.setdefault(key, _HostPool(self._max_per_host))
        pool.users += 1
        try:
            async with pool.slots:
                yield Lease(self, key, pool, hop)
        finally:
            pool.users -= 1
            self._forget_if_unused(key, pool)

    async def close(self) -> None:
        """QUIT and close idle connections; sessions in use are closed when they finish."""
        self._closed = True
        sessions = [s for pool in self._pools.values() for s in pool.idle]
        for pool in self._pools.values():
            pool.idle.clear()
        self._pools = {k: p for k, p in self._pools.items() if p.users}
        await asyncio.gather(*(self._quit(s) for s in sessions))

    async def open(self, hop: HostPort) -> Session | Outcome:
        """Connect; the one TLS fallback: failed opportunistic STARTTLS -> plain text, once."""
        place = where(hop)
        try:
            return await self._connect(hop, starttls=self._tls != "none")
        except TlsFailed as exc:
            if self._tls != "opportunistic":
                return outcome_for_error(exc, place)
        except Exception as exc:
            return outcome_for_error(exc, place)
        try:
            return await self._connect(hop, starttls=False)
        except Exception as exc:
            return outcome_for_error(exc, place)

    async def _connect(self, hop: HostPort, *, starttls: bool) -> Session:
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
                    raise TlsFailed() from exc
            elif starttls and self._tls == "required":
                raise TlsFailed()
        except BaseException:
            smtp.close()
            raise
        return Session(smtp, hop)

    @staticmethod
    async def _hello(smtp: SMTP) -> None:
        try:
            await smtp.ehlo()
        except SMTPHeloError:
            if not smtp.is_connected:
                raise
            await smtp.helo()  # an old server without ESMTP

    def checkin(self, key: _Key, pool: _HostPool, session: Session, reusable: bool) -> None:
        if self._closed or not reusable or self._idle_timeout <= 0 \
                or not session.smtp.is_connected:
            session.smtp.close()
            return
        loop = asyncio.get_running_loop()
        session.timer = loop.call_later(self._idle_timeout, self._expire, key, pool, session)
        pool.idle.append(session)

    def _expire(self, key: _Key, pool: _HostPool, session: Session) -> None:
        """Timer callback: an idle session was not reused in time."""
        if session in pool.idle:
            pool.idle.remove(session)
            session.smtp.close()
            self._forget_if_unused(key, pool)

    def _forget_if_unused(self, key: _Key, pool: _HostPool) -> None:
        if pool.users == 0 and not pool.idle and self._pools.get(key) is pool:
            del self._pools[key]

    @staticmethod
    async def _quit(session: Session) -> None:
        session.cancel_timer()
        try:
            await session.smtp.quit(timeout=QUIT_TIMEOUT)
        except Exception:  # a courtesy only; the connection is closed below either way
            pass
        finally:
            session.smtp.close()
