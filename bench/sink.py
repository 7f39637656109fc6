"""The stand-in "gmail": an aiosmtpd server that accepts, refuses a share, or answers 4xx.

What it does: `python3 -m bench.sink --port P [--host H] [--refuse-share X] [--tempfail]
[--signatures] [--no-chunking]` listens on H:P (default 127.0.0.2: a loopback address of its own, as Gmail is a
host of its own), prints `ready` once it listens, then one line per finished transaction on
stdout: `<CLOCK_MONOTONIC ns> <seq> <A|R|T>` (accepted, refused, temporary failure), where <seq>
is the message's `X-Bench-Seq:` header or `-`; with `--signatures`, a fourth field: how many
DKIM-Signature fields the message's header holds (0 for a 4xx at RCPT). The time is taken when
the end of DATA (or the last BDAT chunk) is received, before the reply is sent (for 4xx at RCPT: when RCPT arrives).
A message carrying `X-Bench-Refuse: yes` is always refused; otherwise every message whose
running count k satisfies floor(k * share) > floor((k - 1) * share) is refused (an exact,
evenly spread share).
It advertises PIPELINING, ENHANCEDSTATUSCODES and CHUNKING in EHLO, as Gmail's MX does (clients
that pipeline or send BDAT save round trips here as they would there): BDAT (RFC 3030, which
aiosmtpd 1.4.6 lacks) is `ChunkingSMTP`'s; the message of the LAST chunk is judged, time-stamped
and answered as the end of DATA is; a BDAT without MAIL and an accepted RCPT has its chunk read
and discarded, then 503. `--no-chunking` leaves CHUNKING out (BDAT is then an unknown command):
the stand-in as it was before.
Refusals are `552 5.7.0` at end of DATA (or BDAT LAST), as Gmail refuses content; `--tempfail` answers every
RCPT with `451 4.7.0` (a downstream that is away). Nothing is stored but what `keep` asks.
Control on stdin, one command a line, each answered `ok` on stdout: `share X`, `tempfail 1|0`
(so the bench changes behaviour without a restart that would break pooled connections), and
`keep N DIR`: write the next N accepted messages as they arrived to DIR/1.eml … N.eml (so the
bench can verify their signatures after a run; DIR is the rest of the line).

Contract: loopback only; no DNS (hostname given). Exposure: bench-only. Failure: exits with an
exception when the port is taken; the parent notices the missing `ready`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope

REFUSE_MARK = b"\nx-bench-refuse: yes"
SEQ_MARK = b"\nx-bench-seq: "
REFUSAL = "552 5.7.0 Message refused by the stand-in gmail (bench)"
TEMPFAIL = "451 4.7.0 Try again later (bench stand-in is away)"
HEADER_SCAN = 4096  # the bench headers sit at the top; don't scan 5 KB bodies
NO_TRANSACTION = "503 5.5.1 Error: need MAIL and RCPT command"


@dataclass(frozen=True, slots=True)
class SinkSettings:
    refuse_share: float = 0.0
    tempfail: bool = False
    signatures: bool = False  # report the DKIM-Signature count of each message (4th field)
    chunking: bool = True  # offer CHUNKING (BDAT), as Gmail's MX does


def dkim_signatures(data: bytes) -> int:
    """How many DKIM-Signature fields the header section of `data` holds."""
    end = data.find(b"\r\n\r\n")
    end = data.find(b"\n\n") if end < 0 else end
    head = b"\n" + (data if end < 0 else data[:end]).lower()
    return head.count(b"\ndkim-signature:")


def message_seq(data: bytes) -> str:
    """The X-Bench-Seq header's value, or '-' (case-insensitive, first HEADER_SCAN bytes)."""
    head = b"\n" + data[:HEADER_SCAN].lower()
    at = head.find(SEQ_MARK)
    if at < 0:
        return "-"
    start = at + len(SEQ_MARK)
    end = head.find(b"\n", start)
    return head[start:end].strip().decode("ascii", "replace") or "-"


def refused_by_share(count: int, share: float) -> bool:
    """Whether the count-th message (1-based) is refused, spreading `share` evenly."""
    return math.floor(count * share + 1e-9) > math.floor((count - 1) * share + 1e-9)


class StandInGmail:
    """aiosmtpd handler; writes one line per transaction to `out`."""

    def __init__(self, settings: SinkSettings, out: Any) -> None:
        self.settings, self.out, self.count = settings, out, 0
        self.keep: tuple[Path, int] | None = None  # where to write the next accepted messages, how many
        self.kept = 0

    def _note(self, stamp: int, seq: str, verdict: str, data: bytes = b"") -> None:
        extra = f" {dkim_signatures(data)}" if self.settings.signatures else ""
        self.out.write(f"{stamp} {seq} {verdict}{extra}\n")
        self.out.flush()

    def _keep(self, data: bytes) -> None:
        if self.keep is None:
            return
        where, wanted = self.keep
        self.kept += 1
        (where / f"{self.kept}.eml").write_bytes(data)
        if self.kept >= wanted:
            self.keep = None

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a handle_EHLO hook
        chunking = ["250-CHUNKING"] if self.settings.chunking else []
        return responses[:1] + ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", *chunking] + responses[1:]

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if self.settings.tempfail:
            self._note(time.monotonic_ns(), "-", "T")
            return TEMPFAIL
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        stamp = time.monotonic_ns()
        data: bytes = envelope.original_content or b""
        self.count += 1
        seq = message_seq(data)
        marked = REFUSE_MARK in b"\n" + data[:HEADER_SCAN].lower()
        if marked or (seq == "-" and refused_by_share(self.count, self.settings.refuse_share)):
            self._note(stamp, seq, "R", data)
            return REFUSAL
        self._note(stamp, seq, "A", data)
        self._keep(data)
        return "250 2.0.0 OK stand-in gmail accepted"


class ChunkingSMTP(SMTP):
    """aiosmtpd's server with BDAT (RFC 3030): chunks gather in the envelope's content; the LAST
    one goes to the handler's `handle_DATA`, as the end of DATA does."""

    async def smtp_BDAT(self, arg: str | None) -> None:
        words = (arg or "").split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or [w.upper() for w in words[1:]] not in ([], ["LAST"]):
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")  # no size known: nothing to skip
            return
        size, last = int(words[0]), len(words) == 2
        try:
            chunk = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError:
            self._writer.close()
            return
        envelope: Envelope | None = self.envelope
        if envelope is None or envelope.mail_from is None or not envelope.rcpt_tos:
            await self.push(NO_TRANSACTION)  # RFC 3030 2: the chunk is read, then refused
            return
        content = (envelope.original_content or b"") + chunk
        envelope.original_content = envelope.content = content
        limit = self.data_size_limit
        if limit and len(content) > limit:
            self._set_post_data_state()
            await self.push("552 5.3.4 Error: Too much mail data")
            return
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status if isinstance(status, str) else "250 OK")


def control(handler: StandInGmail, line: str) -> None:
    """Apply one stdin command to the running handler (share and tempfail restart the count)."""
    match line.split(None, 2):
        case ["share", value]:
            handler.settings = replace(handler.settings, refuse_share=float(value))
            handler.count = 0
        case ["tempfail", value]:
            handler.settings = replace(handler.settings, tempfail=value == "1")
            handler.count = 0
        case ["keep", wanted, where]:
            Path(where).mkdir(parents=True, exist_ok=True)
            handler.keep, handler.kept = (Path(where), int(wanted)), 0
        case _:
            raise ValueError(f"unknown sink command {line!r}")
    print("ok", flush=True)


async def _read_commands(handler: StandInGmail) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        control(handler, line.decode().strip())


async def serve(host: str, port: int, settings: SinkSettings) -> None:
    loop = asyncio.get_running_loop()
    handler = StandInGmail(settings, sys.stdout)
    commands = asyncio.create_task(_read_commands(handler))
    kind = ChunkingSMTP if settings.chunking else SMTP
    server = await loop.create_server(
        lambda: kind(handler, hostname="mx.gmail.standin", ident="ESMTP", decode_data=False),
        host=host, port=port, backlog=256)
    print("ready", flush=True)
    async with server:
        await commands  # the parent closing our stdin ends the sink



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.sink", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.2")
    parser.add_argument("--refuse-share", type=float, default=0.0)
    parser.add_argument("--tempfail", action="store_true")
    parser.add_argument("--signatures", action="store_true",
                        help="add each message's DKIM-Signature count to its line")
    parser.add_argument("--no-chunking", action="store_true",
                        help="do not offer CHUNKING (BDAT): the stand-in without it")
    args = parser.parse_args(argv)
    try:
        if not args.host.startswith("127."):
            parser.error("the stand-in listens on loopback only")
        asyncio.run(serve(args.host, args.port, SinkSettings(args.refuse_share, args.tempfail, args.signatures,
                                                                 not args.no_chunking)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
