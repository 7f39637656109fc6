"""A small SMTP client for one-message-at-a-time latency runs, and the bench's test messages.

What it does: `send_one(port, data)` opens a connection to 127.0.0.1:port, says EHLO, MAIL,
RCPT, DATA, sends `data` (already dot-stuffed CRLF text), and returns the CLOCK_MONOTONIC time
(ns) at which the final reply's last line was read — the moment a sender knows the message is
accepted. Then it says QUIT. `bench_message(seq, refuse=...)` builds a message with the
`X-Bench-Seq` header (and `X-Bench-Refuse: yes`, which the stand-in gmail always refuses).

Contract: loopback only; one connection per message, as independent senders do. Exposure:
bench-only. Failure: `SmtpError` when any reply is not the expected 2xx/3xx, naming the reply.
"""

from __future__ import annotations

import asyncio
import time

PUBLIC = "ituki@example.com"
SENDER = "alice@sender.example"


class SmtpError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines: list[str] = []
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed: " + " / ".join(lines))
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text)
        if len(text) < 4 or text[3] != "-":
            return int(text[:3]), " / ".join(lines)


async def send_one(port: int, data: bytes, *, sender: str = SENDER, rcpt: str = PUBLIC) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async def command(line: str, expect: int) -> None:
            writer.write(line.encode() + b"\r\n")
            code, text = await _reply(reader)
            if code // 100 != expect:
                raise SmtpError(f"{line.split(':')[0]}: {text}")

        code, text = await _reply(reader)
        if code != 220:
            raise SmtpError(f"greeting: {text}")
        await command("EHLO client.bench.test", 2)
        await command(f"MAIL FROM:<{sender}>", 2)
        await command(f"RCPT TO:<{rcpt}>", 2)
        await command("DATA", 3)
        writer.write(data + b".\r\n")
        code, text = await _reply(reader)
        accepted = time.monotonic_ns()
        if code // 100 != 2:
            raise SmtpError(f"end of DATA: {text}")
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        return accepted
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def bench_message(seq: str, *, refuse: bool = False, body_bytes: int = 1024) -> bytes:
    """A plain message of about `body_bytes` body octets; lines never start with a dot."""
    line = b"The quick brown fox jumps over the lazy dog, once more for the bench.\r\n"
    body = (line * (body_bytes // len(line) + 1))[:body_bytes].rsplit(b"\r\n", 1)[0] + b"\r\n"
    head = (f"From: Alice <{SENDER}>\r\nTo: <{PUBLIC}>\r\nSubject: bench {seq}\r\n"
            f"Message-ID: <bench-{seq}-{time.time_ns()}@sender.example>\r\n"
            f"X-Bench-Seq: {seq}\r\n" + ("X-Bench-Refuse: yes\r\n" if refuse else "")
            + "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    return head.encode() + body
