"""The wire: aiosmtpd behind a thin adapter, on the application's own event loop.

Faces the internet. What it adds to aiosmtpd 1.4.6 (see DESIGN.md gotchas and docs/quirks.md):
  - no software version in the banner (`ident`);
  - enhanced status codes on the library's own replies, translated here in one place;
  - addresses judged on the raw argument, before aiosmtpd's parser strips what it finds there:
    source routes, quoted strings and comments get 553 5.1.3;
  - a command line that ends in a bare LF or holds a bare CR gets 521 5.5.2 and is closed;
  - each received chunk resets the idle timer, so slow-but-moving DATA is not cut off, while a
    whole DATA may take at most `data_timeout`;
  - a cap on concurrent sessions (421 4.7.0 and closed), and the per-client limits of
    `inbound.limits`: sessions per client and connection rate at connect (421), message and
    recipient rates at MAIL and RCPT (450 4.7.1); within a session, commands without progress,
    the session's lifetime and refused recipients (421, closed).
Each check is O(1): a few comparisons per command, a dict lookup per MAIL/RCPT.
Exceptions in the handler are answered 451 4.3.0 by `Handler.handle_exception`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any, Awaitable, Callable, cast

from aiosmtpd.smtp import SMTP

from maildetour.config.model import SmtpConfig
from maildetour.core import replies
from maildetour.core.address import SOURCE_ROUTE, raw_path_problem
from maildetour.core.client_key import client_key
from maildetour.core.replies import Reply
from maildetour.inbound.data_budget import DataBudget
from maildetour.inbound.handler import Handler
from maildetour.inbound.limits import Clients, default_limits, sender_domain
from maildetour.metrics import Metrics

log = logging.getLogger("maildetour.inbound")

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")
# Replies to these commands that start with 250 move a transaction on (DATA: its final 250).
_PROGRESS = frozenset({b"MAIL", b"RCPT", b"DATA"})


def translate(status: str) -> str:
    """aiosmtpd reply -> the same reply with an enhanced status code (RFC 2034)."""
    if status in replies.LIBRARY_REPLIES:
        return replies.LIBRARY_REPLIES[status]
    code = status[:3]
    if not code.isdigit() or code[0] not in "45" or _HAS_ENHANCED.match(status):
        return status
    text = status[4:].removeprefix("Error: ")
    return f"{code} {replies.DEFAULT_ENHANCED[code[0]]} {text}"


class _Refusal(Exception):
    """Raised from the command reader: aiosmtpd hands it to `handle_exception`, which answers
    `reply` instead of running the command; we hang up after the reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


# How long a DATA waits for room in the budget before 452 (RFC 5321 4.5.3.2.2: a client waits
# at least 2 minutes for the reply to DATA).
_DATA_BUDGET_WAIT = 60.0
# The first seconds of DATA are free of `min_data_rate`; after them a session must have sent
# at least `min_data_rate` bytes a second on average (then 421 4.4.2 and the connection closed).
_DATA_RATE_GRACE = 30.0


def _declared_size(mail_options: list[str]) -> int | None:
    """The SIZE= of MAIL FROM (RFC 1870), if the client gave one."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


class Session(SMTP):
    """One client connection."""

    def __init__(self, handler: Handler, *, data_timeout: float, on_close: Callable[[], None],
                 max_line_length: int, clients: Clients, budget: DataBudget, metrics: Metrics | None = None,
                 **kwargs: Any) -> None:
        self.line_length_limit = max_line_length + 3  # CRLF and a transparency dot (RFC 5321 4.5.2)
        super().__init__(handler, **kwargs)
        self._budget = budget
        self._max_size: int = self.data_size_limit or 0
        self._metrics = metrics  # every refusal we send is counted here, and only here
        self._data_timeout = data_timeout
        self._data_started: float | None = None
        self._data_bytes = 0  # received since DATA began (for `min_data_rate`)
        self._held: list[str] = []
        self._on_close = on_close
        self._clients = clients
        self._limits: SmtpConfig = clients.limits
        self._client: str | None = None  # the client's key; None: not counted (unlimited or refused)
        self._started = 0.0
        self._command = b""  # the first four octets of the command being answered, upper case
        self._idle_commands = 0  # commands since the last progress (an accepted MAIL, RCPT, DATA)
        self._refused = 0  # refused recipients in this session
        self._closing = False  # hang up once the current reply is written
        self._overlong = False  # reading the rest of a command line over the reader's limit

    # --- the connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the TCP connection (not the switch to TLS after STARTTLS)
            self._started = self.loop.time()
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if peer else ""
            if not self._clients.unlimited(host):  # the limits across sessions apply
                key = client_key(host)
                refusal = self._clients.arrive(key, self._started)
                if refusal is not None:
                    log.warning("refused a connection from %s: %s", host, refusal.text)
                    if self._metrics is not None:
                        self._metrics.refused(str(refusal))
                    # uvloop's transports are not asyncio.WriteTransport subclasses: cast, not isinstance
                    cast(asyncio.WriteTransport, transport).write(f"{refusal}\r\n".encode())
                    transport.close()
                    return
                self._client = key
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            if self.session is not None:  # else refused in connection_made: aiosmtpd never started
                super().connection_lost(error)
        finally:
            if self._client is not None:
                self._clients.leave(self._client)
                self._client = None
            if self._on_close is not None:
                self._on_close()
                self._on_close = None  # type: ignore[assignment]

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        read = reader.readuntil

        def readuntil(separator: bytes = b"\n") -> Awaitable[bytes]:
            if separator != b"\n":  # a DATA line (read up to CRLF): as it was, no extra frame
                return read(separator)
            return command_line()

        async def command_line() -> bytes:
            try:
                line = await read(b"\n")
            except asyncio.LimitOverrunError:
                self._overlong = True  # aiosmtpd reads on to the end of the line, then says 500
                raise
            self._check_command(line, tail=self._overlong)
            self._overlong = False
            return line

        # aiosmtpd reads every command line through this one call; checking there sees the raw
        # line (aiosmtpd strips its line end) before the command runs.
        reader.readuntil = readuntil  # type: ignore[method-assign, assignment]

    def _check_command(self, line: bytes, *, tail: bool) -> None:
        """Before a command runs (or, `tail`, before aiosmtpd refuses a too long one). Raises
        `_Refusal` to answer it with a refusal instead."""
        self._command = b"" if tail else line[:4].upper()
        if not tail and (not line.endswith(b"\r\n") or line.find(b"\r", 0, len(line) - 2) >= 0):
            raise _Refusal(replies.BARE_LF_COMMAND)
        if self.loop.time() - self._started > self._limits.max_session_time:
            raise _Refusal(replies.SESSION_TIME)
        if self._refused >= self._limits.max_refused_recipients:
            raise _Refusal(replies.SESSION_REFUSED)
        self._idle_commands += 1
        if self._idle_commands > self._limits.max_commands_without_progress:
            raise _Refusal(replies.NO_PROGRESS)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, _Refusal):
            log.info("%s: %s", self.session.peer if self.session else "?", error.reply.text)
            self._closing = True
            return str(error.reply)
        return str(await super().handle_exception(error))

    # --- replies ----------------------------------------------------------------------------
    async def push(self, status: Any) -> None:
        """Send a reply line. Lines of a multi-line reply ("250-...") are held and written with
        the last one: one system call for the whole EHLO reply instead of one per line."""
        if isinstance(status, str):
            status = translate(status)
            if status[3:4] == "-":
                self._held.append(status)
                return
            if self._command in _PROGRESS:
                self._observe(status)
            if self._metrics is not None and status[:1] in ("4", "5"):
                self._metrics.refused(status)
            if self._held:
                status = "\r\n".join([*self._held, status])
                self._held.clear()
        await super().push(status)
        if self._closing:
            self._hang_up()

    def _observe(self, status: str) -> None:
        """A reply to MAIL, RCPT or DATA: progress, or a refused recipient."""
        if status.startswith("250"):
            self._idle_commands = 0
        elif status.startswith("5") and self._command == b"RCPT":
            self._refused += 1
            if self._client is not None:
                self._clients.refused(self._client, self.loop.time())

    def _hang_up(self) -> None:
        """Close after the reply just written, and stop reading: a pipelined command already
        in the buffer must not run after we said goodbye."""
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        if self.transport is not None:
            self.transport.close()
            self.transport = None  # aiosmtpd's command and DATA loops end when this is None

    # --- the idle timer during DATA -----------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._data_started is not None:
            elapsed = self.loop.time() - self._data_started
            self._data_bytes += len(data)
            rate = self._limits.min_data_rate  # Postfix's smtpd_min_data_rate: a trickle holds no budget
            too_slow = rate > 0 and elapsed > _DATA_RATE_GRACE + self._data_bytes / rate
            if elapsed > self._data_timeout or too_slow:
                if self.transport is not None:
                    if too_slow:
                        log.info("%s: DATA slower than %d bytes/s; 421", self.session.peer if self.session else "?",
                                 rate)
                        if self._metrics is not None:
                            self._metrics.refused(str(replies.DATA_TOO_SLOW))
                        cast(asyncio.WriteTransport, self.transport).write(str(replies.DATA_TOO_SLOW).encode() + b"\r\n")
                    self.transport.close()
                return
            self._reset_timeout()  # moving data keeps the session alive
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        reserved = 0
        if self.envelope is not None and self.envelope.rcpt_tos and not arg:  # else aiosmtpd says 503/501
            declared = _declared_size(self.envelope.mail_options)
            reserved = declared if declared is not None else self._max_size
            if not await self._budget.reserve(reserved, _DATA_BUDGET_WAIT):
                log.warning("%s: no room to receive %d more bytes; 452", self.session.peer if self.session else "?",
                            reserved)
                await self.push(str(replies.NO_STORAGE))
                return
            if declared is not None:  # what the reservation covers, with room for dot-stuffing
                self.data_size_limit = min(self._max_size, declared + declared // 10 + 65536)
        self._data_started, self._data_bytes = self.loop.time(), 0
        try:
            await super().smtp_DATA(arg)
        finally:
            self._data_started = None
            if reserved:
                self._budget.release(reserved)
                self.data_size_limit = self._max_size

    # --- MAIL and RCPT ------------------------------------------------------------------------
    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and arg[:5].upper() == "FROM:" and (problem := self._path_problem(arg[5:])):
            await self.push(str(problem))
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg and arg[:3].upper() == "TO:" and (problem := self._path_problem(arg[3:])):
            await self.push(str(problem))
            return
        await super().smtp_RCPT(arg)

    @staticmethod
    def _path_problem(path: str) -> Reply | None:
        problem = raw_path_problem(path)
        if problem is None:
            return None
        return replies.SOURCE_ROUTE if problem.reason == SOURCE_ROUTE else replies.ADDRESS_FORM

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        """MAIL and RCPT reach the handler only within the client's rates (after aiosmtpd has
        checked their syntax, so a malformed command spends nothing)."""
        if self._client is not None and command in ("MAIL", "RCPT"):
            now = self.loop.time()
            if command == "MAIL":  # args[0]: the sender ("<>" for the null sender)
                refusal = self._clients.mail(self._client, sender_domain(args[0]), now)
            else:
                assert self.envelope is not None
                refusal = self._clients.rcpt(self._client, sender_domain(self.envelope.mail_from or ""), now)
            if refusal is not None:
                log.info("%s: %s", self.session.peer if self.session else "?", refusal.text)
                return str(refusal)
        return await super()._call_handler_hook(command, *args)


class _TooBusy(asyncio.Protocol):
    """Says 421 to a client over the session limit, then closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(  # uvloop's are no subclass: no isinstance
            f"{replies.TOO_MANY_SESSIONS}\r\n".encode())
        transport.close()


class SessionFactory:
    """Builds a `Session` per connection while fewer than `max_sessions` are open. `limits`
    (the `[smtp]` config) gives the per-client limits; without it, their defaults."""

    def __init__(self, handler: Handler, *, hostname: str, max_sessions: int, max_message_size: int,
                 command_timeout: float, data_timeout: float, tls: ssl.SSLContext | None,
                 max_line_length: int, limits: SmtpConfig | None = None, metrics: Metrics | None = None) -> None:
        self.open = 0
        self.metrics = metrics
        self.clients = Clients(limits if limits is not None else default_limits(max_sessions))
        self.budget = DataBudget(self.clients.limits.max_bytes_receiving)
        self.configure(handler, hostname=hostname, max_sessions=max_sessions, max_message_size=max_message_size,
                       command_timeout=command_timeout, data_timeout=data_timeout, tls=tls,
                       max_line_length=max_line_length, limits=limits)

    def configure(self, handler: Handler, *, hostname: str, max_sessions: int, max_message_size: int,
                  command_timeout: float, data_timeout: float, tls: ssl.SSLContext | None,
                  max_line_length: int, limits: SmtpConfig | None = None) -> None:
        """Settings for sessions from now on (a reload); open sessions keep theirs. Per-client
        counts start afresh only when the `[smtp]` table changed."""
        self.handler, self.hostname, self.max_sessions = handler, hostname, max_sessions
        self.max_line_length = max_line_length
        self.max_message_size, self.tls = max_message_size, tls
        self.command_timeout, self.data_timeout = command_timeout, data_timeout
        wanted = limits if limits is not None else default_limits(max_sessions)
        if self.clients.limits != wanted:
            self.clients = Clients(wanted)
        self.budget.limit = wanted.max_bytes_receiving  # the reservations in force stay

    def _closed(self) -> None:
        self.open -= 1

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.max_sessions:
            log.warning("session limit %d reached; answering 421", self.max_sessions)
            if self.metrics is not None:
                self.metrics.refused(str(replies.TOO_MANY_SESSIONS))
            return _TooBusy()
        self.open += 1
        return Session(
            self.handler, data_timeout=self.data_timeout, on_close=self._closed,
            max_line_length=self.max_line_length, clients=self.clients, budget=self.budget, metrics=self.metrics,
            hostname=self.hostname, ident="ESMTP", data_size_limit=self.max_message_size,
            enable_SMTPUTF8=True, decode_data=False, tls_context=self.tls,
            timeout=self.command_timeout, loop=asyncio.get_running_loop(),
        )


async def start_smtp(factory: SessionFactory, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host=host, port=port, reuse_address=True)
