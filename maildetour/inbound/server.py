"""The wire: aiosmtpd behind a thin adapter, on the application's own event loop.

Faces the internet. What it adds to aiosmtpd 1.4.6 (see DESIGN.md gotchas):
  - no software version in the banner (`ident`);
  - enhanced status codes on the library's own replies, translated here in one place;
  - source routes (`<@a:b@c>`) refused instead of silently stripped;
  - each received chunk resets the idle timer, so slow-but-moving DATA is not cut off, while a
    whole DATA may take at most `data_timeout`;
  - a cap on concurrent sessions: excess clients get 421 4.7.0 and are closed.
Exceptions in the handler are answered 451 4.3.0 by `Handler.handle_exception`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any, Callable

from aiosmtpd.smtp import SMTP

from maildetour.core import replies
from maildetour.inbound.handler import Handler

log = logging.getLogger("maildetour.inbound")

_SOURCE_ROUTE = re.compile(r"^\s*(?:TO|FROM):\s*<\s*@", re.I)
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")


def translate(status: str) -> str:
    """aiosmtpd reply -> the same reply with an enhanced status code (RFC 2034)."""
    if status in replies.LIBRARY_REPLIES:
        return replies.LIBRARY_REPLIES[status]
    code = status[:3]
    if not code.isdigit() or code[0] not in "45" or _HAS_ENHANCED.match(status):
        return status
    text = status[4:].removeprefix("Error: ")
    return f"{code} {replies.DEFAULT_ENHANCED[code[0]]} {text}"


class Session(SMTP):
    """One client connection."""

    def __init__(self, handler: Handler, *, data_timeout: float, on_close: Callable[[], None],
                 max_line_length: int, **kwargs: Any) -> None:
        self.line_length_limit = max_line_length + 3  # CRLF and a transparency dot (RFC 5321 4.5.2)
        super().__init__(handler, **kwargs)
        self._data_timeout = data_timeout
        self._data_started: float | None = None
        self._held: list[str] = []
        self._on_close = on_close

    async def push(self, status: Any) -> None:
        """Send a reply line. Lines of a multi-line reply ("250-...") are held and written with
        the last one: one system call for the whole EHLO reply instead of one per line."""
        if isinstance(status, str):
            status = translate(status)
            if status[3:4] == "-":
                self._held.append(status)
                return
            if self._held:
                status = "\r\n".join([*self._held, status])
                self._held.clear()
        await super().push(status)

    def data_received(self, data: bytes) -> None:
        if self._data_started is not None:
            if self.loop.time() - self._data_started > self._data_timeout:
                if self.transport is not None:
                    self.transport.close()
                return
            self._reset_timeout()  # moving data keeps the session alive
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        self._data_started = self.loop.time()
        try:
            await super().smtp_DATA(arg)
        finally:
            self._data_started = None

    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and _SOURCE_ROUTE.match(arg):
            await self.push(str(replies.SOURCE_ROUTE))
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg and _SOURCE_ROUTE.match(arg):
            await self.push(str(replies.SOURCE_ROUTE))
            return
        await super().smtp_RCPT(arg)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            if self._on_close is not None:
                self._on_close()
                self._on_close = None  # type: ignore[assignment]


class _TooBusy(asyncio.Protocol):
    """Says 421 to a client over the session limit, then closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(f"{replies.TOO_MANY_SESSIONS}\r\n".encode())
        transport.close()


class SessionFactory:
    """Builds a `Session` per connection while fewer than `max_sessions` are open."""

    def __init__(self, handler: Handler, *, hostname: str, max_sessions: int, max_message_size: int,
                 command_timeout: float, data_timeout: float, tls: ssl.SSLContext | None,
                 max_line_length: int) -> None:
        self.handler, self.hostname, self.max_sessions = handler, hostname, max_sessions
        self.max_line_length = max_line_length
        self.max_message_size, self.tls = max_message_size, tls
        self.command_timeout, self.data_timeout = command_timeout, data_timeout
        self.open = 0

    def _closed(self) -> None:
        self.open -= 1

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.max_sessions:
            log.warning("session limit %d reached; answering 421", self.max_sessions)
            return _TooBusy()
        self.open += 1
        return Session(
            self.handler, data_timeout=self.data_timeout, on_close=self._closed,
            max_line_length=self.max_line_length,
            hostname=self.hostname, ident="ESMTP", data_size_limit=self.max_message_size,
            enable_SMTPUTF8=True, decode_data=False, tls_context=self.tls,
            timeout=self.command_timeout, loop=asyncio.get_running_loop(),
        )


async def start_smtp(factory: SessionFactory, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host=host, port=port, reuse_address=True)
