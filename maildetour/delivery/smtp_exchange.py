"""The bytes of one outbound SMTP transaction, on a connection aiosmtplib opened and greeted.

Internal; talks to remote (untrusted) servers. `borrow(smtp)` puts an `Exchange` in the place
of aiosmtplib's protocol on the session's transport for one transaction and puts aiosmtplib's
back afterwards; `Exchange.write` sends bytes that ask for a number of replies, and
`Exchange.reply` returns those replies one by one, in order, however they arrived
(`smtp_pipeline.ReplyParser`). What to send and what the replies mean is `smtp_pipeline`'s.

Why not aiosmtplib for the transaction: its protocol (checked on 5.1.3) hands out one reply
per command written and either strands or drops a reply that arrives ahead of its command
(two replies in one read: the second stays in its buffer, unparsed, until the read times
out; a reply in a read of its own before `read_response` is awaited: discarded), so it
cannot pipeline (RFC 2920) through its API. aiosmtplib still connects, reads the greeting,
says EHLO, does STARTTLS, RSET and QUIT (`smtp_pool`), where a client gains nothing from
pipelining. The trade-off: this relies on `SMTP.transport` and `SMTP.protocol` (public
attributes of aiosmtplib's client), on asyncio's `set_protocol` (every transport has it, TLS
ones included), and on aiosmtplib keeping no state about a transaction it did not see: true
of what the pool asks of it between transactions (RSET, QUIT). The other way, a client of our
own for the whole session, would duplicate connect, EHLO and STARTTLS for no gain. A connection lost while borrowed
is passed on to aiosmtplib's protocol, so `smtp.is_connected` stays true to the socket; bytes
that arrive after a transaction go to aiosmtplib, which discards what it did not ask for.

Failure: `reply` raises `Disconnected` (`smtp_errors`) when the connection ends first,
`TimeoutError` after its timeout, `MalformedReply` when the server sent something that is not
an SMTP reply or a reply nothing asked for; `write` and `borrow` raise `Disconnected` on a
closed connection. After any of these the session must be closed, not reused (`idle` is false).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, cast

from aiosmtplib import SMTP

from maildetour.delivery.smtp_errors import Disconnected
from maildetour.delivery.smtp_pipeline import (
    Finished,
    MalformedReply,
    Reply,
    ReplyParser,
    Send,
    Stage,
    Step,
    Transaction,
)

# `send` hands the transport this much at a time, and waits while its buffer is full.
_SLICE = 1 << 20


class Exchange(asyncio.Protocol):
    """The protocol on a borrowed transport: replies in order, none dropped."""

    def __init__(self, transport: asyncio.WriteTransport, previous: asyncio.BaseProtocol) -> None:
        self._transport = transport
        self._previous = previous
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._owed = 0  # replies asked for and not yet received
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False  # the transport's buffer is above its high-water mark
        self._drained: asyncio.Future[None] | None = None
        self.lost = False

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def idle(self) -> bool:
        """Nothing unread, nothing owed, nothing wrong: the session may be used again."""
        return not (self._replies or self._owed or self._parser.pending or self._error or self.lost)

    def write(self, data: bytes | memoryview, replies: int) -> None:
        if self.lost or self._transport.is_closing():
            raise Disconnected()
        self._owed += replies
        self._transport.write(data)

    async def send(self, data: bytes, replies: int, timeout: float) -> None:
        """`write`, a slice at a time, each taken by the kernel within `timeout` (RFC 5321
        4.5.3.2.5's data block limit): the wait for the reply then starts when the last byte is
        on its way, not while a large message still sits in our buffer behind a slow link."""
        if len(data) <= _SLICE:
            self.write(data, replies)
            return
        view = memoryview(data)
        for start in range(0, len(data), _SLICE):
            end = start + _SLICE
            self.write(view[start:end], replies if start == 0 else 0)  # owed at once: a reply may come early
            if self._paused:
                self._drained = asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout(timeout):
                        await self._drained
                finally:
                    self._drained = None
                if self._error is not None:
                    raise self._error

    async def reply(self, timeout: float) -> Reply:
        """The next reply, in the order the commands were written."""
        if not self._replies and self._error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            finally:
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        raise cast(Exception, self._error)

    # asyncio.Protocol
    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            replies = self._parser.feed(data)
            if len(replies) > self._owed:
                raise MalformedReply("a reply nothing asked for")
        except MalformedReply as exc:
            self._fail(exc)
            return
        self._owed -= len(replies)
        self._replies.extend(replies)
        if replies:
            self._wake()

    def eof_received(self) -> bool:
        self._fail(Disconnected())
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(Disconnected())
        self._previous.connection_lost(exc)  # aiosmtplib learns it too (and closes its SMTP)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # `send` sees the error


@contextmanager
def borrow(smtp: SMTP) -> Iterator[Exchange]:
    """The session's connection for one transaction; aiosmtplib gets it back at the end."""
    transport, previous = smtp.transport, smtp.protocol
    if transport is None or previous is None or transport.is_closing():
        raise Disconnected()
    exchange = Exchange(cast(asyncio.WriteTransport, transport), previous)
    transport.set_protocol(exchange)
    try:
        yield exchange
    finally:
        if not exchange.lost:
            transport.set_protocol(previous)
            if exchange.paused and isinstance(previous, asyncio.Protocol):
                previous.pause_writing()  # its resume_writing will come to aiosmtplib


class Connection(Protocol):
    """A pooled connection of the SMTP or the LMTP agent."""

    smtp: SMTP
    unchecked: bool  # reused from idle: cleared by the first reply


async def carry(connection: Connection, transaction: Transaction, *, command_timeout: float,
                data_timeout: float) -> tuple[Finished, bool]:
    """Run `transaction` on the connection: its bytes out (`Exchange.send`), its replies in, each
    within `command_timeout`, or `data_timeout` for the replies to DATA and to the message
    (BDAT LAST's too). The final step, and whether the exchange ended idle (nothing owed,
    nothing unread, no error)."""
    with borrow(connection.smtp) as exchange:
        step: Step = transaction.start()
        while not isinstance(step, Finished):
            if isinstance(step, Send):
                await exchange.send(step.data, step.replies, command_timeout)
            slow = transaction.waiting in (Stage.DATA, Stage.MESSAGE, Stage.EMPTY, Stage.BDAT)
            reply = await exchange.reply(data_timeout if slow else command_timeout)
            connection.unchecked = False
            step = transaction.receive(reply)
        return step, exchange.idle
