"""Outbound SMTP connections: open, greet, STARTTLS, keep idle for reuse, limit per host.

Internal; talks to remote (untrusted) servers. `SmtpPool.slot(hop)` holds one of the host's
`max_per_host` slots for one transaction; inside it `checkout` hands out an idle session of
that host (as it is when its last transaction ended with a final reply to the message; else,
when the server offers PIPELINING, marked `reset_first` so the transaction pipelines a RSET
ahead of MAIL, and otherwise after a lock-step RSET that worked) or opens a new one, and
`checkin` keeps a reusable session idle for `idle_timeout` (closed then, or on any error, or
on `close()`). Sessions are kept per host and TLS mode (`delivery.tls_policy`): "none" never
starts TLS; "opportunistic" uses STARTTLS when offered, unverified, and falls back to plain
text once if it fails (one place: `open`); "required" must get STARTTLS and does not check the
certificate; "verify" must get STARTTLS and a certificate valid for the host's name (the MX or
relay name) against `verify_context`. Without the TLS its mode asks for, a session is a
temporary failure, never a downgrade.
Failure: never raises for remote or network trouble; `checkout`/`open` return an `Outcome`
instead of a session (`smtp_errors`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiosmtplib import SMTP
from aiosmtplib.errors import SMTPHeloError

from maildetour.core.hostport import HostPort
from maildetour.core.outcome import Outcome
from maildetour.delivery.smtp_errors import TlsFailed, outcome_for_error, where
from maildetour.delivery.tls_policy import TlsMode

# QUIT on close() is a courtesy; do not let a slow server hold up shutdown.
QUIT_TIMEOUT = 2.0


async def quit_politely(smtp: SMTP) -> None:
    """QUIT within QUIT_TIMEOUT, then close: a courtesy only, the connection is closed either way
    (the SMTP and LMTP agents' idle connections)."""
    try:
        await smtp.quit(timeout=QUIT_TIMEOUT)
    except Exception:
        pass
    finally:
        smtp.close()


_Key = tuple[str, int, str, TlsMode]


class Session:
    """One open, greeted SMTP connection (a resource, not a value)."""

    __slots__ = ("smtp", "hop", "timer", "clean", "unchecked", "reset_first")

    def __init__(self, smtp: SMTP, hop: HostPort) -> None:
        self.smtp = smtp
        self.hop = hop
        self.timer: asyncio.TimerHandle | None = None
        # After a final reply to the message (end of DATA, or a 2xx to BDAT LAST) the server has
        # reset its state (RFC 5321 4.1.1.4), so the next transaction needs no RSET: one round
        # trip less per reused session.
        self.clean = False
        self.unchecked = False  # reused without RSET: a first-command disconnect is retried
        self.reset_first = False  # not clean, PIPELINING: RSET goes in the transaction's first write

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


def _unverified_context() -> ssl.SSLContext:
    """Opportunistic TLS (RFC 7435), and "required": encrypt without authenticating."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Lease:
    """One slot at one host, held for one transaction."""

    __slots__ = ("_owner", "_key", "_pool", "hop", "mode")

    def __init__(self, owner: SmtpPool, key: _Key, pool: _HostPool, hop: HostPort, mode: TlsMode) -> None:
        self._owner, self._key, self._pool, self.hop, self.mode = owner, key, pool, hop, mode

    async def checkout(self) -> Session | Outcome:
        """An idle session that is clean, or is to pipeline a RSET (`reset_first`), or answers
        RSET; or a new one; or why there is none."""
        pool = self._pool
        while pool.idle:
            session = pool.idle.pop()
            session.cancel_timer()
            session.reset_first = False
            if session.smtp.is_connected and (session.clean or session.smtp.supports_extension("pipelining")):
                session.reset_first = not session.clean
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
        return await self._owner.open(self.hop, self.mode)

    def checkin(self, session: Session, reusable: bool) -> None:
        self._owner.checkin(self._key, self._pool, session, reusable)


class SmtpPool:
    def __init__(self, *, local_hostname: str, verify_context: ssl.SSLContext, connect_timeout: float,
                 command_timeout: float, idle_timeout: float, max_per_host: int) -> None:
        if max_per_host < 1:
            raise ValueError("max_connections_per_host must be at least 1")
        self._local_hostname = local_hostname
        self._contexts: dict[TlsMode, ssl.SSLContext] = {
            "opportunistic": _unverified_context(), "required": _unverified_context(), "verify": verify_context}
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._idle_timeout = idle_timeout
        self._max_per_host = max_per_host
        self._pools: dict[_Key, _HostPool] = {}
        self._closed = False

    @asynccontextmanager
    async def slot(self, hop: HostPort, mode: TlsMode) -> AsyncIterator[Lease]:
        # Sessions are shared per address and TLS mode; with verified TLS, per name as well.
        key = (hop.host, hop.port, hop.name if mode == "verify" else "", mode)
        pool = self._pools.setdefault(key, _HostPool(self._max_per_host))
        pool.users += 1
        try:
            async with pool.slots:
                yield Lease(self, key, pool, hop, mode)
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

    async def open(self, hop: HostPort, mode: TlsMode) -> Session | Outcome:
        """Connect; the one TLS fallback: failed opportunistic STARTTLS -> plain text, once."""
        place = where(hop) if mode in ("none", "opportunistic") else f"{where(hop)} (TLS {mode})"
        try:
            return await self._connect(hop, mode, starttls=mode != "none")
        except TlsFailed as exc:
            if mode != "opportunistic":
                return outcome_for_error(exc, place)
        except Exception as exc:
            return outcome_for_error(exc, place)
        try:
            return await self._connect(hop, mode, starttls=False)
        except Exception as exc:
            return outcome_for_error(exc, place)

    async def _connect(self, hop: HostPort, mode: TlsMode, *, starttls: bool) -> Session:
        smtp = SMTP(hostname=hop.host, port=hop.port, local_hostname=self._local_hostname,
                    timeout=self._command_timeout, start_tls=False, use_tls=False)
        try:
            await smtp.connect(timeout=self._connect_timeout)  # TCP and the 220 greeting
            await self._hello(smtp)
            if starttls and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(server_hostname=hop.name or hop.host, tls_context=self._contexts[mode],
                                        timeout=self._connect_timeout)
                    await self._hello(smtp)
                except Exception as exc:
                    raise TlsFailed() from exc
            elif starttls and mode != "opportunistic":
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
        await quit_politely(session.smtp)
