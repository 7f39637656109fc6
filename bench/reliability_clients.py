"""Clients of the reliability run: one SMTP transaction from a chosen loopback address, and one
POP3 login. Both report what happened as a value; neither raises for a refusal or a dead peer.

What it does: `send_from(port, data, source=...)` connects from `source` (another loopback
address is another client to the server), says EHLO, MAIL, RCPT, DATA, sends `data`
(dot-stuffed CRLF text without the final dot, which it adds) and QUIT, and returns a `Sent`:
the stage it reached, the last reply, and the CLOCK_MONOTONIC times of the connect and of the
reply that ended it. `stage(name)` callbacks
tell a caller where the transaction is ("data" while the body is being sent, "dot" once the
final dot is out and the 250 is awaited: a crash then falls mid-commit). `pop3_login` logs in
with USER/PASS, asks STAT and says QUIT.

Contract: loopback only; one connection per call, closed before returning. Exposure:
bench-only. Failure: never raises for the peer's behaviour (timeouts and resets are a `Sent`
with stage "lost" or "connect"); raises only on a bug.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.client import PUBLIC, SENDER, SmtpError, _reply

CHUNK = 65536  # bytes written before waiting for the socket to take them
POP3_USER = "ituki@pc.example.net"
POP3_PASSWORD = "change-me"  # the seed's (maildetour/seed.toml)


@dataclass(frozen=True, slots=True)
class Sent:
    stage: str  # "connect", "greeting", "EHLO", "MAIL", "RCPT", "DATA", "end", "lost" (no reply)
    code: int  # the last reply's code (0: none)
    text: str
    connected_ns: int  # 0 when the connect failed
    replied_ns: int  # the reply that ended it (the 250 after DATA when accepted)

    @property
    def accepted(self) -> bool:
        return self.stage == "end" and self.code == 250


async def send_from(port: int, data: bytes | tuple[bytes, ...], *, source: str = "127.0.0.1", host: str = "127.0.0.1",
                    sender: str = SENDER, rcpt: str = PUBLIC, timeout: float = 120.0,
                    stage: Callable[[str], None] | None = None, pace: tuple[int, float] | None = None) -> Sent:
    """One transaction; see the module docstring. `data` may come in parts (a big body shared
    by many messages is then never copied). `pace` (chunk size, pause in seconds): send the
    body that slowly, as a client on a slow line does."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(source, 0)), timeout)
    except (OSError, TimeoutError) as exc:
        return Sent("connect", 0, type(exc).__name__, 0, time.monotonic_ns())
    connected = time.monotonic_ns()
    step = "greeting"
    try:
        async def reply() -> tuple[int, str]:
            return await asyncio.wait_for(_reply(reader), timeout)

        code, text = await reply()
        if code != 220:
            return Sent(step, code, text, connected, time.monotonic_ns())
        for step, line, want in (("EHLO", "EHLO client.bench.test", 250), ("MAIL", f"MAIL FROM:<{sender}>", 250),
                                 ("RCPT", f"RCPT TO:<{rcpt}>", 250), ("DATA", "DATA", 354)):
            writer.write(line.encode() + b"\r\n")
            code, text = await reply()
            if code != want:
                return Sent(step, code, text, connected, time.monotonic_ns())
        step = "end"
        if stage:
            stage("data")
        chunk, pause = pace or (CHUNK, 0.0)
        for part in (data,) if isinstance(data, bytes) else data:
            view = memoryview(part)
            for at in range(0, len(view), chunk):
                writer.write(view[at:at + chunk])
                await writer.drain()  # little buffered here, however big the message
                if pause:
                    await asyncio.sleep(pause)
        writer.write(b".\r\n")
        if stage:
            stage("dot")
        code, text = await reply()
        done = time.monotonic_ns()
        if code == 250:
            writer.write(b"QUIT\r\n")
            try:
                await asyncio.wait_for(_reply(reader), 5)
            except (SmtpError, OSError, TimeoutError):
                pass
        return Sent("end", code, text, connected, done)
    except (SmtpError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return Sent("lost", 0, f"{step}: {type(exc).__name__}", connected, time.monotonic_ns())
    finally:
        if stage:
            stage("idle")
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (OSError, TimeoutError):
            pass


@dataclass(frozen=True, slots=True)
class Login:
    ok: bool
    seconds: float  # connect until the reply to PASS
    reply: str  # the reply that decided it (greeting, USER or PASS)


async def pop3_login(port: int, *, source: str = "127.0.0.1", user: str = POP3_USER,
                     password: str = POP3_PASSWORD, timeout: float = 30.0) -> Login:
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), timeout)
    except (OSError, TimeoutError) as exc:
        return Login(False, time.monotonic() - start, f"connect: {type(exc).__name__}")
    try:
        async def line() -> str:
            got = await asyncio.wait_for(reader.readline(), timeout)
            if not got:
                raise ConnectionResetError("closed")
            return got.decode("utf-8", "replace").rstrip("\r\n")

        greeting = await line()
        if not greeting.startswith("+OK"):
            return Login(False, time.monotonic() - start, greeting)
        for command in (f"USER {user}", f"PASS {password}"):
            writer.write(command.encode() + b"\r\n")
            answer = await line()
            if not answer.startswith("+OK"):
                return Login(False, time.monotonic() - start, answer)
        took = time.monotonic() - start
        writer.write(b"STAT\r\n")
        await line()
        writer.write(b"QUIT\r\n")
        await line()
        return Login(True, took, "+OK")
    except (OSError, TimeoutError) as exc:
        return Login(False, time.monotonic() - start, f"lost: {type(exc).__name__}")
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (OSError, TimeoutError):
            pass
