"""LMTP delivery (RFC 2033): every mailbox copy handed to a mail store such as Dovecot instead of
our own Maildirs, so that several nodes share one set of mailboxes (`[delivery] lmtp`).

Internal; talks to the mail store, a server of our own operator: its replies still go through
`core.classify` (cleaned and capped) and become the private reason of an outcome; exception
texts are never copied anywhere (`smtp_errors`).
Contract: `deliver(job)` returns an outcome for every recipient and never raises for trouble at
the mail store. One transaction per job, all the job's mailboxes in it: MAIL, one RCPT per
recipient, DATA, the stored message unchanged (it already carries our Received line), then one
reply per accepted recipient, each deciding its own copy like an SMTP reply (4xx temporary; 5xx
permanent, which then takes the usual detour or DSN: Dovecot's `552 5.2.2` over quota, `550
5.1.1` for a user it does not know, an alert). The rules are `smtp_pipeline`'s (`lmtp=True`: pipelined, since RFC
2033 makes PIPELINING mandatory, or lock-step when a server does not offer it); the bytes go
through `smtp_exchange` on a connection aiosmtplib opened (TCP or a Unix socket) and greeted;
LHLO goes through aiosmtplib's `execute_command` and its reply is read as an EHLO reply.

Connections: at most `max_connections_per_host` at once; one whose last transaction ended with
every final reply (the server has reset it) is kept idle `connection_idle_timeout` for the next
job, like the SMTP pool (an idle connection the server closed meanwhile is replaced once, when
no reply at all came: nothing can have been stored twice). A new connection costs a connect,
the greeting and LHLO on top of a delivery (against Dovecot 2.3 on loopback, a quiet run of one
delivery at a time: about 460/s on a kept TCP connection, 280/s with a new one each time).
A transaction that did not end with the final replies (every recipient refused, DATA refused,
a 421) is not reused: the connection is closed rather than RSET.

What goes into the mailbox: the stored message, with nothing added or removed; the mail store
writes Return-Path (the envelope sender, as `local` does for a Maildir) and its own Received
and Delivered-To, naming the mailbox (the RCPT), so a copy detoured from a hidden address never
names it. No SMTPUTF8 at the store (Dovecot 2.3 offers none) means an international envelope
sender or mailbox address is refused by `parameters` (550 5.6.7, permanent), as Postfix does.
STARTTLS is not used: LMTP goes over a Unix socket or a private network.

Failure: the mail store down (connection refused, no socket file, a timeout, a lost connection,
a reply that is no reply) is a TemporaryFailure, never Unreachable: it is our own store, not a
destination that does not exist, so the copy waits and is retried (on a hidden chain it moves
on after `detour_after`, as after any temporary failure). A connection lost after some
recipients' final replies keeps those: a copy the store said it saved is delivered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Mapping

from aiosmtplib import SMTP
from aiosmtplib.errors import SMTPResponseException

from maildetour.config.model import DeliveryConfig, LmtpServer
from maildetour.core.classify import classify_reply
from maildetour.core.outcome import Outcome, PermanentFailure, TemporaryFailure, Unreachable
from maildetour.delivery.base import Job
from maildetour.delivery.smtp_errors import Disconnected, outcome_for_error, where
from maildetour.delivery.smtp_exchange import carry
from maildetour.delivery.smtp_pipeline import (
    Finished,
    Transaction,
    Unsendable,
    parameters,
    sendable,
)
from maildetour.delivery.smtp_pool import quit_politely


class _Connection:
    """One open, greeted (LHLO) connection to the mail store (a resource, not a value)."""

    __slots__ = ("smtp", "timer", "unchecked")

    def __init__(self, smtp: SMTP) -> None:
        self.smtp = smtp
        self.timer: asyncio.TimerHandle | None = None
        self.unchecked = False  # reused from idle: a disconnect before any reply is retried

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _refusal(code: int, status: str, text: str, public: str) -> PermanentFailure:
    """A copy we refuse to hand over ourselves, because the mail store could never take it."""
    return PermanentFailure(f"{code} {status} {text} (local check)", code, status, public)


class LmtpAgent:
    """Delivers mailbox copies to the mail store by LMTP; implements `delivery.base.Agent`."""

    def __init__(self, *, server: LmtpServer, local_hostname: str, settings: DeliveryConfig) -> None:
        self._server = server
        if server.socket is not None:
            self._place = f"lmtp:{server.socket}"
        elif server.address is not None:
            self._place = f"lmtp:{where(server.address)}"
        else:
            raise ValueError("an LMTP server needs an address or a socket")
        self._local_hostname = local_hostname
        self._connect_timeout = settings.connect_timeout
        self._command_timeout = settings.command_timeout
        self._data_timeout = settings.data_timeout
        self._idle_timeout = settings.connection_idle_timeout
        self._slots = asyncio.Semaphore(settings.max_connections_per_host)
        self._idle: list[_Connection] = []
        self._closed = False

    def batch_key(self, target: str) -> str:
        """Every mailbox copy of a message goes in one transaction (a reply each)."""
        return ""

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        started = time.monotonic()
        results: dict[str, Outcome] = {}
        for rcpt in job.recipients:
            if "@" not in rcpt or not sendable(rcpt):
                results[rcpt] = _refusal(553, "5.1.3", "mailbox address cannot be sent by LMTP",
                                         "the address cannot be used in SMTP")
        pending = tuple(dict.fromkeys(r for r in job.recipients if r not in results))
        if pending and not sendable(job.mail_from):
            refused = _refusal(553, "5.1.7", "sender address cannot be sent by LMTP",
                               "the sender address cannot be used in SMTP")
            results.update((r, refused) for r in pending)
            pending = ()
        if pending:
            part = dataclasses.replace(job, recipients=pending)
            async with self._slots:
                connection = await self._checkout()
                connect = time.monotonic() - started
                if isinstance(connection, _Connection):
                    outcomes = await self._run(connection, part)
                else:
                    outcomes = {r: connection for r in pending}
            results.update((r, dataclasses.replace(o, relay=self._place, connect=connect))
                           for r, o in outcomes.items())
        return {r: results[r] for r in job.recipients}

    async def close(self) -> None:
        """QUIT and close idle connections; those in use are closed when their job ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c) for c in idle))

    # --- connections ------------------------------------------------------------------------
    async def _checkout(self) -> _Connection | Outcome:
        """An idle connection (its last transaction ended clean), or a new one, or why not."""
        while self._idle:
            connection = self._idle.pop()
            connection.cancel_timer()
            if connection.smtp.is_connected:
                connection.unchecked = True
                return connection
            connection.smtp.close()
        return await self._open()

    async def _open(self) -> _Connection | Outcome:
        """Connect (TCP or Unix socket), read the greeting, say LHLO."""
        server = self._server
        if server.socket is not None:
            smtp = SMTP(socket_path=str(server.socket), local_hostname=self._local_hostname,
                        timeout=self._command_timeout, start_tls=False, use_tls=False)
        else:
            assert server.address is not None
            smtp = SMTP(hostname=server.address.host, port=server.address.port,
                        local_hostname=self._local_hostname, timeout=self._command_timeout,
                        start_tls=False, use_tls=False)
        try:
            await smtp.connect(timeout=self._connect_timeout)
            response = await smtp.execute_command(b"LHLO", self._local_hostname.encode("ascii", "replace"))
            if response.code != 250:
                raise SMTPResponseException(response.code, response.message)
            smtp.last_ehlo_response = response  # aiosmtplib reads the keywords (esmtp_extensions)
        except Exception as exc:
            smtp.close()
            return self._trouble(exc)
        except BaseException:  # cancelled: nothing is left open
            smtp.close()
            raise
        return _Connection(smtp)

    def _checkin(self, connection: _Connection, reusable: bool) -> None:
        if self._closed or not reusable or self._idle_timeout <= 0 or not connection.smtp.is_connected:
            connection.smtp.close()
            return
        loop = asyncio.get_running_loop()
        connection.timer = loop.call_later(self._idle_timeout, self._expire, connection)
        self._idle.append(connection)

    def _expire(self, connection: _Connection) -> None:
        """Timer callback: an idle connection was not reused in time."""
        if connection in self._idle:
            self._idle.remove(connection)
            connection.smtp.close()

    @staticmethod
    async def _quit(connection: _Connection) -> None:
        connection.cancel_timer()
        await quit_politely(connection.smtp)

    def _trouble(self, exc: BaseException) -> Outcome:
        """The outcome for `exc`; the mail store out of reach is temporary, not Unreachable."""
        outcome = outcome_for_error(exc, self._place)
        if isinstance(outcome, Unreachable):
            return TemporaryFailure(outcome.reason, 451, "4.4.1", "the mailbox store cannot be reached now")
        return outcome

    # --- one transaction --------------------------------------------------------------------
    async def _run(self, connection: _Connection, job: Job) -> dict[str, Outcome]:
        """The job's transaction on `connection`; an outcome for each of its recipients."""
        reusable = False
        transaction: Transaction | None = None
        try:
            plan = parameters(connection.smtp.esmtp_extensions, job.mail_from, job.recipients, job.data)
            if isinstance(plan, Unsendable):
                refusal = _refusal(plan.code, plan.status, plan.text, plan.public)
                reusable = True  # nothing was sent
                return {r: refusal for r in job.recipients}
            transaction = Transaction(job.mail_from, job.recipients, plan.options, data=job.data,
                                      utf8=plan.utf8, pipelining="pipelining" in connection.smtp.esmtp_extensions,
                                      lmtp=True)
            finished, reusable = await self._exchange(connection, transaction)
            return {r: classify_reply(reply.code, reply.text) for r, reply in finished.replies.items()}
        except Disconnected as exc:
            if connection.unchecked and transaction is not None and not transaction.decided:
                # The store closed the idle connection just before we reused it: once more, on a
                # fresh connection (checked in by the inner call; this one is closed below).
                connection.smtp.close()
                fresh = await self._open()
                if isinstance(fresh, _Connection):
                    return await self._run(fresh, job)
                return {r: fresh for r in job.recipients}
            return self._partial(transaction, job, self._trouble(exc))
        except Exception as exc:  # a timeout or a malformed reply mid-transaction
            return self._partial(transaction, job, self._trouble(exc))
        finally:  # also on cancellation: then the connection is closed, not kept
            self._checkin(connection, reusable)

    async def _exchange(self, connection: _Connection, transaction: Transaction) -> tuple[Finished, bool]:
        """Carry the transaction's bytes; the final step and whether the connection is clean."""
        step, idle = await carry(connection, transaction, command_timeout=self._command_timeout,
                                 data_timeout=self._data_timeout)
        reusable = idle and step.clean and not step.closing
        return step, reusable and connection.smtp.is_connected

    @staticmethod
    def _partial(transaction: Transaction | None, job: Job, failure: Outcome) -> dict[str, Outcome]:
        """After trouble mid-transaction: what a reply already decided stands (a copy the store
        said it saved is delivered, not sent again); the rest share `failure`."""
        decided = transaction.decided if transaction is not None else {}
        return {r: classify_reply(decided[r].code, decided[r].text) if r in decided else failure
                for r in job.recipients}
