"""SMTP transaction logic: RCPT -> routing, DATA -> checks -> store -> 250.

Faces the internet (behind `inbound.server`, the aiosmtpd adapter). Contract: "250 queued as"
is returned only after `Store.accept` has made the message and its copies durable, and a
message the store committed is always scheduled: storing and scheduling run as one task that a
client hanging up cannot cancel halfway (issue 10 #2). Replies come from `core.replies` only,
so no address or exception text reaches a client. Bad input gets a reply; a store that cannot
write gets 452 4.3.1 when the disk is full, else 451 4.3.0; an unexpected exception gets
451 4.3.0 (see `handle_exception`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import dns.resolver

from maildetour.core import replies
from maildetour.core.address import AddressError, parse_address
from maildetour.core.authres import strip_our_results
from maildetour.core.received import (
    count_received,
    find_message_id,
    has_bare_cr_or_lf,
    received_header,
)
from maildetour.core.routing import Accept, RoutingTable, route
from maildetour.metrics import Metrics
from maildetour.sign.srs import SrsCodec, SrsError, is_srs
from maildetour.store.base import Store, disk_full
from maildetour.store.records import (
    Copy,
    CopyState,
    Event,
    Message,
    NewCopy,
    new_queue_id,
)
from maildetour.verify.verdicts import check

log = logging.getLogger("maildetour.inbound")

NULL_SENDER = "<>"  # how aiosmtpd hands us MAIL FROM:<>

# Errors of a store that ran out of room (disk full, quota; SQLite says SQLITE_FULL = 13).

T = TypeVar("T")


def storage_reply(error: OSError | sqlite3.Error) -> replies.Reply:
    """What a client hears when the store could not write: 452 4.3.1 for a full disk (it may
    send again later, RFC 3463), 451 4.3.0 for any other local error. Never the error's text."""
    return replies.NO_STORAGE if disk_full(error) else replies.INTERNAL_ERROR


@dataclass(frozen=True, slots=True)
class InboundLimits:
    max_recipients: int
    max_received: int


@dataclass(frozen=True, slots=True)
class Checks:
    """SPF/DKIM/DMARC of received mail, as one Authentication-Results header (verify.verdicts)."""

    authserv_id: str
    resolver: dns.resolver.Resolver
    timeout: float

    async def header(self, data: bytes, *, client_ip: str, helo: str, mail_from: str) -> bytes:
        try:
            verdicts = await check(data, client_ip=client_ip, helo=helo, mail_from=mail_from,
                                   authserv_id=self.authserv_id, resolver=self.resolver, timeout=self.timeout)
        except Exception:  # a bug in a check must not lose the message: no header, logged
            log.exception("inbound checks failed; no Authentication-Results added")
            return b""
        return verdicts.field()


# (the DSN as stored, its bytes, the original senders its SRS recipients decode to)
LateBounce = Callable[[Message, bytes, tuple[str, ...]], Awaitable[None]]


class Handler:
    def __init__(self, *, table: RoutingTable, store: Store, hostname: str, limits: InboundLimits,
                 on_accepted: Callable[[list[Copy]], None], clock: Callable[[], float],
                 checks: Checks | None = None, srs: SrsCodec | None = None,
                 on_late_bounce: LateBounce | None = None, authserv_id: str | None = None,
                 metrics: Metrics | None = None) -> None:
        self.table, self.store, self.hostname, self.limits = table, store, hostname, limits
        self.on_accepted, self.clock, self.metrics = on_accepted, clock, metrics
        self.checks, self.srs, self.on_late_bounce = checks, srs, on_late_bounce
        self._commits: set[asyncio.Future[Any]] = set()  # in flight, perhaps for a client long gone
        # Incoming Authentication-Results claiming our id are forged: removed when we check or sign.
        self.authserv_id = checks.authserv_id if checks is not None else authserv_id

    def reconfigured(self, *, table: RoutingTable, hostname: str, limits: InboundLimits,
                     checks: Checks | None, srs: SrsCodec | None, authserv_id: str | None) -> Handler:
        """A handler for new sessions after a reload: the new config's parts, the same store,
        scheduler and late-bounce handling, and the same commits in flight (`drain` on either
        waits for both). Sessions already open keep the handler they started with."""
        new = Handler(table=table, store=self.store, hostname=hostname, limits=limits,
                      on_accepted=self.on_accepted, clock=self.clock, checks=checks, srs=srs,
                      on_late_bounce=self.on_late_bounce, authserv_id=authserv_id, metrics=self.metrics)
        new._commits = self._commits
        return new

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        keep = [r for r in responses[1:] if not r[4:].startswith(("AUTH", "HELP"))]
        lines = [responses[0], *keep, "250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return [*lines[:-1], "250 " + lines[-1][4:]]

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if address != NULL_SENDER and isinstance(parse_address(address), AddressError):
            return str(replies.BAD_SENDER)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.routes = []
        envelope.srs_rcpts = []
        return str(replies.SENDER_OK)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        routes: list[Accept] = envelope.routes
        if len(routes) >= self.limits.max_recipients:
            return str(replies.TOO_MANY_RECIPIENTS)
        parsed = parse_address(address)
        if isinstance(parsed, AddressError):
            return str(replies.BAD_RECIPIENT)
        if self.srs is not None and parsed.domain == self.srs.domain and is_srs(str(parsed)):
            return self._srs_recipient(envelope, address, str(parsed))
        if envelope.srs_rcpts:
            return str(replies.SEPARATE_BOUNCES)
        found = route(self.table, parsed)
        if not isinstance(found, Accept):
            log.info("RCPT refused from %s: %s", session.peer, found.why)
            return str(found.reply)
        routes.append(found)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RECIPIENT_OK)

    def _srs_recipient(self, envelope: Any, address: str, srs_address: str) -> str:
        """Our SRS address: only DSNs for mail we forwarded may come back here (late bounces).
        A forged or expired one is unknown, so nobody can use us to reach arbitrary addresses."""
        assert self.srs is not None
        if envelope.routes:
            return str(replies.SEPARATE_BOUNCES)
        original = self.srs.reverse(srs_address, self.clock())
        if isinstance(original, SrsError):
            return str(replies.UNKNOWN_USER)
        envelope.srs_rcpts.append(original)
        envelope.rcpt_tos.append(address)
        return str(replies.RECIPIENT_OK)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content
        if has_bare_cr_or_lf(data):
            return str(replies.BARE_CR_LF)
        now = self.clock()
        queue_id = new_queue_id(now)
        routes: Sequence[Accept] = envelope.routes
        client_ip = str(session.peer[0]) if session.peer else "unknown"
        sender = "" if envelope.mail_from == NULL_SENDER else envelope.mail_from
        if self.authserv_id is not None:
            data = strip_our_results(data, self.authserv_id)
        checks_header = b""
        if self.checks is not None:
            checks_header = await self.checks.header(data, client_ip=client_ip, helo=session.host_name or "",
                                                     mail_from=sender)
        protocol = ("ESMTPS" if session.ssl else "ESMTP") if session.extended_smtp else "SMTP"
        if envelope.smtp_utf8:
            protocol = "UTF8SMTPS" if session.ssl else "UTF8SMTP"  # RFC 6531 section 3.7.3
        received = received_header(
            helo=session.host_name or "", client_ip=client_ip, hostname=self.hostname,
            queue_id=queue_id, protocol=protocol,
            recipients=tuple(r.recipient for r in routes), now=now,
        )
        full = b"".join((received, checks_header, data))  # one copy of the message, not two
        client = f"{session.host_name} [{client_ip}]"
        message = Message(queue_id, sender, now, find_message_id(data), len(full), client)
        looped = False
        if envelope.srs_rcpts:
            assert self.on_late_bounce is not None
            work: Awaitable[object] = self.on_late_bounce(message, full, tuple(envelope.srs_rcpts))
        else:
            looped = count_received(full) > self.limits.max_received
            copies = self._plan(routes, "quarantined" if looped else "queued",
                                "mail loop: too many Received headers" if looped else "")
            events = [Event(now, queue_id, None, "accepted", ",".join(r.recipient for r in routes),
                            f"from=<{sender}> client={message.client} size={len(full)}")]
            work = self._commit(message, full, copies, events, schedule=not looped)
        try:
            await self._unstoppable(work, queue_id)
        except (OSError, sqlite3.Error) as error:
            return str(storage_reply(error))
        kind = "late bounce" if envelope.srs_rcpts else "accepted"
        if self.metrics is not None:
            self.metrics.accepted(len(envelope.srs_rcpts or routes))
            for copy in copies if looped else ():  # born quarantined (a loop): never attempted
                self.metrics.settled("quarantined", copy.target)
        fields = {"queue_id": queue_id, "from": f"<{sender}>", "size": len(full),
                  "nrcpt": len(envelope.srs_rcpts or routes), "client": message.client,
                  "message_id": message.message_id or "none"}
        log.info("%s: %s", queue_id, kind, extra={"fields": fields})  # like Postfix's qmgr "from=<...>" line
        return str(replies.queued(queue_id))

    async def _commit(self, message: Message, data: bytes, copies: list[NewCopy], events: list[Event],
                      *, schedule: bool) -> list[Copy]:
        made = await self.store.accept(message, data, copies, events)
        if schedule:
            self.on_accepted(made)
        return made

    async def drain(self) -> None:
        """Wait for the commits in flight (at shutdown: before the store's writer stops)."""
        await asyncio.gather(*self._commits, return_exceptions=True)

    async def _unstoppable(self, work: Awaitable[T], queue_id: str) -> T:
        """Run `work` (store, then schedule) to its end even if the session is cancelled
        meanwhile (aiosmtpd cancels `handle_DATA` when the client hangs up after the final dot):
        a commit must always lead to scheduling. The client that got no 250 may send again; a
        duplicate is the price (at-least-once), a message stuck until a restart is not."""
        task = asyncio.ensure_future(work)
        self._commits.add(task)

        def done(finished: asyncio.Future[Any]) -> None:
            self._commits.discard(finished)
            error = None if finished.cancelled() else finished.exception()
            if isinstance(error, (OSError, sqlite3.Error)):
                log.error("storing %s failed: %s", queue_id, error)  # our log only, never a reply
            elif error is not None:
                log.error("storing %s failed", queue_id, exc_info=error)

        task.add_done_callback(done)
        return await asyncio.shield(task)

    def _plan(self, routes: Sequence[Accept], state: CopyState, why: str) -> list[NewCopy]:
        """One copy per destination, even when several recipients lead to the same one."""
        copies: dict[str, NewCopy] = {}
        for found in routes:
            for target in found.targets:
                if target not in copies:
                    copies[target] = NewCopy(found.recipient, target, self.table.is_hidden(target), state, why)
        return list(copies.values())

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error", exc_info=error)
        return str(replies.INTERNAL_ERROR)
