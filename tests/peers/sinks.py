"""A scripted SMTP sink for tests: aiosmtpd on loopback, in its own thread and event loop.

Test-only; listens on a loopback address only. It records every message it accepts and can be
told to answer like a troubled host: the first N DATA attempts get a 4xx (`temp_failures`),
a message can be refused at end of DATA (`refuse(data)`), a recipient at RCPT (`rcpt(addr)`),
a sender at MAIL (`mail(addr)`), DATA replies can be slowed down (`delay`), STARTTLS offered
(`tls_context`), PIPELINING advertised (`pipelining`: aiosmtpd takes pipelined commands either
way, but advertises PIPELINING only when a handler adds it to EHLO).

    with running_sink(temp_failures=2) as sink:
        ... deliver to sink.host:sink.port ...
        [msg] = sink.wait_for(1)

Counters: `connections` (TCP connections accepted), `attempts` (mail transactions that reached
RCPT, refused ones included), `data_attempts` (DATA commands). The server thread is stopped and
joined when the `with` block ends.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from aiosmtpd.smtp import SMTP, Envelope, Session

SINK_HOSTNAME = "sink.test"  # given to aiosmtpd so it never calls socket.getfqdn()


@dataclass(frozen=True, slots=True)
class Received:
    mail_from: str  # "" for the null sender <>
    rcpt_tos: tuple[str, ...]
    data: bytes
    at: float  # time.time() at end of DATA
    mail_options: tuple[str, ...] = ()  # e.g. ("SIZE=123", "BODY=8BITMIME", "SMTPUTF8")
    tls: bool = False  # the session had done STARTTLS


class Sink:
    """What a running sink saw. Safe to read from the test's thread."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._attempts = 0
        self._data_attempts = 0
        self._connections = 0

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    @property
    def attempts(self) -> int:
        """Mail transactions that reached RCPT, including refused ones."""
        with self._cond:
            return self._attempts

    @property
    def data_attempts(self) -> int:
        with self._cond:
            return self._data_attempts

    @property
    def connections(self) -> int:
        with self._cond:
            return self._connections

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `count` messages were accepted; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.mail_from, m.rcpt_tos) for m in self._messages]
                    raise AssertionError(
                        f"sink {self.host}:{self.port}: expected {count} message(s) within "
                        f"{timeout}s, got {len(self._messages)} {seen}; "
                        f"connections={self._connections} attempts={self._attempts} "
                        f"data_attempts={self._data_attempts}"
                    )
                self._cond.wait(left)
            return list(self._messages)

    def _count(self, *, connection: bool = False, attempt: bool = False,
               data: bool = False) -> int:
        with self._cond:
            self._connections += connection
            self._attempts += attempt
            self._data_attempts += data
            return self._data_attempts

    def _record(self, message: Received) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()


class _Handler:
    """aiosmtpd handler hooks: the scripted behaviour."""

    def __init__(self, sink: Sink, *, temp_failures: int, temp_reply: str,
                 refuse: Callable[[bytes], str | None] | None,
                 rcpt: Callable[[str], str | None] | None,
                 mail: Callable[[str], str | None] | None, delay: float) -> None:
        self._sink = sink
        self._temp_failures = temp_failures
        self._temp_reply = temp_reply
        self._refuse = refuse
        self._rcpt = rcpt
        self._mail = mail
        self._delay = delay
        self._counted: weakref.WeakSet[Envelope] = weakref.WeakSet()

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        reply = self._mail(address) if self._mail is not None else None
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if envelope not in self._counted:
            self._counted.add(envelope)
            self._sink._count(attempt=True)
        reply = self._rcpt(address) if self._rcpt is not None else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        nth = self._sink._count(data=True)
        if self._delay:
            await asyncio.sleep(self._delay)
        if nth <= self._temp_failures:
            return self._temp_reply
        data = envelope.content if isinstance(envelope.content, bytes) else b""
        reply = self._refuse(data) if self._refuse is not None else None
        if reply:
            return reply
        self._sink._record(Received(
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data,
            at=time.time(),
            mail_options=tuple(envelope.mail_options),
            tls=session.ssl is not None,
        ))
        return "250 2.0.0 OK queued"


class _PipeliningHandler(_Handler):
    """The same, advertising PIPELINING in EHLO."""

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a handle_EHLO hook
        return responses[:1] + ["250-PIPELINING"] + responses[1:]


class _Thread:
    """An event loop in a daemon thread, serving SMTP until stopped."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sink", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self, factory: Callable[[], asyncio.Protocol], host: str, port: int) -> int:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(factory, host, port), self.loop)
        try:
            self._server = future.result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


@contextmanager
def running_sink(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    temp_failures: int = 0,
    temp_reply: str = "451 4.3.0 try again later",
    refuse: Callable[[bytes], str | None] | None = None,
    rcpt: Callable[[str], str | None] | None = None,
    mail: Callable[[str], str | None] | None = None,
    delay: float = 0.0,
    tls_context: ssl.SSLContext | None = None,
    smtp_options: dict[str, Any] | None = None,
    pipelining: bool = False,
) -> Iterator[Sink]:
    """Run a capture sink on `host` (a loopback address); port None picks a free one.

    `rcpt`/`mail`: address -> a refusal reply, or None to accept; `delay` seconds pass before
    each DATA reply; `tls_context` makes the sink offer STARTTLS; `pipelining` makes it
    advertise PIPELINING; `smtp_options` go to aiosmtpd's SMTP (e.g. {"data_size_limit": 1000})."""
    sink = Sink(host)
    handler = (_PipeliningHandler if pipelining else _Handler)(
        sink, temp_failures=temp_failures, temp_reply=temp_reply, refuse=refuse, rcpt=rcpt,
        mail=mail, delay=delay)
    runner = _Thread()
    options: dict[str, Any] = {
        "hostname": SINK_HOSTNAME, "ident": "test sink", "decode_data": False,
        "enable_SMTPUTF8": True, "tls_context": tls_context, "timeout": 30,
        **(smtp_options or {}),
    }

    def factory() -> SMTP:
        sink._count(connection=True)
        return SMTP(handler, loop=runner.loop, **options)

    sink.port = runner.start(factory, host, port or 0)
    try:
        yield sink
    finally:
        runner.stop()
