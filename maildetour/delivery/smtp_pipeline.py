"""One outbound SMTP or LMTP mail transaction (RFC 5321; RFC 2920 PIPELINING; RFC 3030
CHUNKING; RFC 2033 LMTP) as a state machine.

Sans-I/O, in h11's style: the server's bytes go into `ReplyParser.feed`, which returns the
complete replies they finish, in order, however the bytes were split across reads (one reply
over many reads, many replies in one read); `Transaction` takes those replies one at a time
and says what happens next: `Send` (bytes to write, and how many replies they ask for),
`NEED_REPLY` (wait for the next reply), or `Finished` (the reply that decides each recipient's
copy, and whether the session is clean or closing). `smtp_exchange` carries the bytes and
`smtp_out` turns the replies into outcomes (`core.classify`).

The rules. With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go in one write, and every
reply is read in order whatever the ones before said: a refused MAIL decides every recipient
(the RCPT and DATA replies that follow, 503s, are read and ignored); a refused RCPT decides its
recipient; the DATA reply, or the reply to the end of the message after a 354, decides the
accepted ones. A 354 when no recipient was accepted (or MAIL was refused) gets the terminating
"." alone (RFC 2920 3.1) and its reply is ignored. Without PIPELINING, the same in lock-step:
one command, one reply; no RCPT after a refused MAIL, no DATA without an accepted recipient.
A 421 reply (the server is closing the session, RFC 5321 3.8) decides every recipient not yet
decided, and no further reply is awaited. The message goes only after a 354, with its line
endings made CRLF and dot-stuffed (RFC 5321 4.5.2), exactly as aiosmtplib's `data` sent it.
`Finished.clean` is true only after the reply to the end of a message: the server has reset
its transaction (RFC 5321 4.1.1.4), so the next one needs no RSET.

CHUNKING (RFC 3030, `chunking=True`, SMTP only) sends the message as one chunk instead:
"BDAT <size> LAST" and the message with its line endings made CRLF (and a final one), not
dot-stuffed, no terminating ".". With PIPELINING it goes in the same write as MAIL and the
RCPTs when it is at most EAGER_BDAT bytes: one round trip for the whole transaction; a larger
one waits for the RCPT replies and goes only if MAIL and a recipient were accepted. Without
PIPELINING it follows the RCPTs in lock-step. The reply to BDAT LAST decides the accepted
recipients; when MAIL was refused or no recipient accepted, the server discards the chunk and
answers 503/554 (3030 2), a reply read and ignored. `clean` only after a 2xx to BDAT LAST
(3030 does not say plainly that a refused BDAT LAST resets the transaction). `reset=True`
(PIPELINING only) puts "RSET" before MAIL in the first write, its reply read and ignored (a
failed RSET shows in MAIL's reply): a reused session that is not clean costs no round trip.

LMTP (RFC 2033, `lmtp=True`) is the same transaction with one difference after the final
".": one reply per accepted recipient, in the order of their RCPTs (4.2), each deciding its
own recipient's copy (Dovecot: "250 2.0.0 <a@b> Saved" for one, "552 5.2.2 <c@d> Quota
exceeded" for the next). A 354 when no recipient was accepted cannot happen in LMTP (DATA must
then fail with 503, 4.2); if it does, nothing is sent and the session is closed (`closing`),
since no count of replies to a "." would be right. `parameters` says what MAIL FROM carries
(SIZE, BODY=8BITMIME, SMTPUTF8) for the extensions a server offered, or why the message could
never go there; both agents use it.

Pure: no sockets, no asyncio, no clock. Exposure: the replies come from remote (untrusted)
servers: a reply line is at most MAX_LINE bytes and a reply at most MAX_REPLY, else
`MalformedReply`; reply text is passed on as received (`core.classify` cleans and caps it).
Failure: bytes that are not an SMTP reply raise `MalformedReply` (the session is unusable
after it); a command argument with a control character raises ValueError (a bug: `smtp_out`
refuses such addresses before a transaction starts).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# aiosmtplib's limits, kept: generous over any real reply (EHLO's is a few hundred bytes),
# and they bound memory when a server streams bytes without a line end or endless
# continuation lines.
MAX_LINE = 8192
MAX_REPLY = 4 * MAX_LINE

_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# What may not go between <> on a MAIL/RCPT line: whitespace, controls, brackets.
_WIRE_UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")
_ACCEPTED_RCPT = (250, 251)
_CLOSING = 421
# With PIPELINING, a message up to this size goes in the first write with MAIL and the RCPTs
# (BDAT LAST): the bytes wasted when every recipient is refused are bounded by it, and it
# spares a round trip for nearly all mail (a larger one waits for the RCPT replies).
EAGER_BDAT = 1 << 20


class MalformedReply(Exception):
    """The server sent something that is not an SMTP reply (or too much of one)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete reply: the last line's code, and the lines' texts joined by newlines."""

    code: int
    text: str


class ReplyParser:
    """Bytes in, complete replies out, in the order they were sent."""

    __slots__ = ("_buffer", "_lines", "_size")

    def __init__(self) -> None:
        self._buffer = bytearray()  # bytes of a line not yet ended
        self._lines: list[bytes] = []  # texts of the current reply's finished lines
        self._size = 0  # bytes of the current reply so far

    @property
    def pending(self) -> bool:
        """Part of a reply has arrived and the rest has not."""
        return bool(self._buffer or self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        """The replies `data` completes (none, one or several). Raises `MalformedReply`."""
        self._buffer += data
        replies: list[Reply] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            reply = self._line(bytes(self._buffer[start:end + 1]))
            if reply is not None:
                replies.append(reply)
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > MAX_LINE or self._size + len(self._buffer) > MAX_REPLY:
            raise MalformedReply("reply too long")
        return replies

    def _line(self, line: bytes) -> Reply | None:
        self._size += len(line)
        if len(line) > MAX_LINE or self._size > MAX_REPLY:
            raise MalformedReply("reply too long")
        if not line[:3].isdigit():
            raise MalformedReply("reply line without a reply code")
        self._lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] == b"-":
            return None
        text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
        self._lines, self._size = [], 0
        return Reply(int(line[:3]), text)


def command(*words: bytes) -> bytes:
    """One command line. Raises ValueError for a control character (a bug upstream)."""
    for word in words:
        if _CONTROL.search(word):
            raise ValueError("SMTP command argument contains a control character")
    return b" ".join(words) + b"\r\n"


def sendable(address: str) -> bool:
    """Whether `address` can go between <> on a MAIL or RCPT line ("" can: the null sender)."""
    return not _WIRE_UNSAFE.search(address)


def crlf_lines(data: bytes) -> bytes:
    """The message with CRLF line endings, and a final one: what goes in a BDAT chunk, and
    what `message_bytes` dot-stuffs. A message whose every line already ends in CRLF (what our
    SMTP intake stores) is passed as it is: three counts instead of a regular expression."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def message_bytes(data: bytes) -> bytes:
    """What follows a 354: the message with CRLF line endings (and a final one), every line
    that starts with "." given another (RFC 5321 4.5.2), and the terminating ".\\r\\n"."""
    data = crlf_lines(data)
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    return data + b".\r\n"


@dataclass(frozen=True, slots=True)
class Parameters:
    """What MAIL FROM carries for one message at one server."""

    options: tuple[str, ...]  # "SIZE=123", "BODY=8BITMIME", "SMTPUTF8"
    utf8: bool  # addresses go as UTF-8 (SMTPUTF8, RFC 6531)


@dataclass(frozen=True, slots=True)
class Unsendable:
    """The server could never take the message as it is: refused by us, never sent."""

    code: int
    status: str
    text: str  # for the operator
    public: str  # for anyone


def _size_limit(extensions: Mapping[str, str]) -> int | None:
    value = extensions.get("size", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def parameters(extensions: Mapping[str, str], mail_from: str, recipients: Sequence[str],
               data: bytes) -> Parameters | Unsendable:
    """MAIL FROM's parameters for `data` at a server that offered `extensions` (EHLO's or
    LHLO's keywords, lowercased), or why it cannot go there: international addresses without
    SMTPUTF8, or more bytes than its SIZE."""
    ascii_addresses = mail_from.isascii() and all(r.isascii() for r in recipients)
    header = data.partition(b"\r\n\r\n")[0]
    utf8 = "smtputf8" in extensions and not (ascii_addresses and header.isascii())
    limit = _size_limit(extensions)
    if not ascii_addresses and not utf8:
        return Unsendable(550, "5.6.7", "next hop does not support SMTPUTF8",
                          "the receiving system does not take international addresses")
    if limit is not None and len(data) > limit:
        return Unsendable(552, "5.3.4", f"message size {len(data)} exceeds the next hop's limit {limit}",
                          "the message is too big for the receiving system")
    options = [f"SIZE={len(data)}"] if "size" in extensions else []
    if "8bitmime" in extensions and not data.isascii():
        options.append("BODY=8BITMIME")
    if utf8:
        options.append("SMTPUTF8")
    return Parameters(tuple(options), utf8)


class Stage(enum.Enum):
    """What a reply answers."""

    RSET = "RSET"  # pipelined before MAIL (`reset`): its code is ignored
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT LAST"  # CHUNKING: the message in one chunk (RFC 3030)
    MESSAGE = "end of message"  # LMTP: one such reply per accepted recipient
    EMPTY = "empty message"  # the "." sent alone after a 354 nobody wanted (RFC 2920 3.1)


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    replies: int  # how many replies these bytes ask for


@dataclass(frozen=True, slots=True)
class NeedReply:
    """Nothing to send: the next reply is awaited."""


NEED_REPLY = NeedReply()


@dataclass(frozen=True, slots=True)
class Finished:
    replies: Mapping[str, Reply]  # every recipient -> the reply that decides its copy
    clean: bool  # a final reply to the end of a message (2xx to BDAT LAST) came: the server reset its state
    closing: bool  # the server said 421 (or owes replies it will not send): do not reuse


Step = Send | NeedReply | Finished


class Transaction:
    """MAIL, RCPT each, DATA, the message (or BDAT LAST with it, `chunking`): one transaction's
    commands and replies (LMTP's with `lmtp`: a reply per accepted recipient after the
    message); `reset` pipelines a RSET before MAIL."""

    __slots__ = ("_mail", "_recipients", "_rcpt_lines", "_data", "_pipelining", "_lmtp", "_chunking",
                 "_reset", "_owed", "_next_rcpt", "_mail_refused", "_accepted", "_replies", "_finished")

    def __init__(self, mail_from: str, recipients: Sequence[str], options: Sequence[str], *,
                 data: bytes, utf8: bool, pipelining: bool, lmtp: bool = False, chunking: bool = False,
                 reset: bool = False) -> None:
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        if reset and not pipelining:
            raise ValueError("RSET goes ahead of MAIL only with PIPELINING")
        encoding = "utf-8" if utf8 else "ascii"
        self._mail = command(b"MAIL", b"FROM:<" + mail_from.encode(encoding) + b">",
                             *(o.encode("ascii") for o in options))
        self._recipients = tuple(recipients)
        self._rcpt_lines = [command(b"RCPT", b"TO:<" + r.encode(encoding) + b">") for r in recipients]
        self._data = data
        self._pipelining = pipelining
        self._lmtp = lmtp
        self._chunking = chunking and not lmtp
        self._reset = reset
        # Replies still to come: (stage, index): a RCPT's index in the recipients; after an LMTP
        # message, the index of an accepted recipient.
        self._owed: deque[tuple[Stage, int]] = deque()
        self._next_rcpt = 0  # lock-step: the next RCPT to send
        self._mail_refused = False
        self._accepted: list[str] = []
        self._replies: dict[str, Reply] = {}
        self._finished: Finished | None = None

    @property
    def decided(self) -> Mapping[str, Reply]:
        """The recipients a reply has decided so far, with it: after a connection lost in an
        LMTP transaction, those already saved stay saved (not sent again)."""
        return dict(self._replies)

    @property
    def waiting(self) -> Stage | None:
        """What the next reply will answer (None: no reply is owed)."""
        return self._owed[0][0] if self._owed else None

    def start(self) -> Send:
        """The first write: MAIL (with PIPELINING: [RSET,] MAIL, every RCPT and DATA, or
        BDAT LAST and the message when it is at most EAGER_BDAT bytes)."""
        if self._owed or self._finished is not None:
            raise RuntimeError("the transaction has already started")
        if not self._pipelining:
            self._owed.append((Stage.MAIL, -1))
            return Send(self._mail, 1)
        parts = [b"RSET\r\n"] if self._reset else []
        self._owed.extend([(Stage.RSET, -1)] if self._reset else [])
        self._owed.append((Stage.MAIL, -1))
        self._owed.extend((Stage.RCPT, i) for i in range(len(self._recipients)))
        parts += (self._mail, *self._rcpt_lines)
        self._next_rcpt = len(self._recipients)
        if not self._chunking:
            self._owed.append((Stage.DATA, -1))
            parts.append(b"DATA\r\n")
        elif len(chunk := crlf_lines(self._data)) <= EAGER_BDAT:
            self._owed.append((Stage.BDAT, -1))
            parts += (b"BDAT %d LAST\r\n" % len(chunk), chunk)
        return Send(b"".join(parts), len(self._owed))

    def receive(self, reply: Reply) -> Step:
        """Take the next reply; say what to do next."""
        if not self._owed:
            raise RuntimeError("no reply is owed")
        stage, index = self._owed.popleft()
        if reply.code == _CLOSING:
            return self._finish(clean=False, closing=True, rest=reply)
        match stage:
            case Stage.RSET:
                return NEED_REPLY  # MAIL's reply follows
            case Stage.MAIL:
                if reply.code != 250:
                    self._mail_refused = True
                    self._replies.update((r, reply) for r in self._recipients)
                    return NEED_REPLY if self._owed else self._finish(clean=False)
                return self._next_command()
            case Stage.RCPT:
                if not self._mail_refused:
                    recipient = self._recipients[index]
                    if reply.code in _ACCEPTED_RCPT:
                        self._accepted.append(recipient)
                    else:
                        self._replies[recipient] = reply
                return self._next_command()
            case Stage.DATA:
                return self._after_data_reply(reply)
            case Stage.BDAT if self._accepted and not self._mail_refused:
                self._replies.update((r, reply) for r in self._accepted)
                return self._finish(clean=200 <= reply.code < 300)
            case Stage.BDAT:  # the server discarded the chunk (RFC 3030 2): decided by MAIL/RCPT
                return self._finish(clean=False)
            case Stage.MESSAGE if self._lmtp:
                self._replies[self._accepted[index]] = reply
                return NEED_REPLY if self._owed else self._finish(clean=True)
            case Stage.MESSAGE:
                self._replies.update((r, reply) for r in self._accepted)
                return self._finish(clean=True)
            case Stage.EMPTY:
                return self._finish(clean=False)
        raise AssertionError(stage)  # pragma: no cover - every stage is matched above

    def _next_command(self) -> Step:
        """After MAIL's or a RCPT's reply: wait for the next owed reply, or (lock-step) send the
        next command, or finish."""
        if self._owed:
            return NEED_REPLY
        if self._next_rcpt < len(self._recipients):
            self._owed.append((Stage.RCPT, self._next_rcpt))
            self._next_rcpt += 1
            return Send(self._rcpt_lines[self._next_rcpt - 1], 1)
        if not self._accepted or self._mail_refused:
            return self._finish(clean=False)  # the transaction stays open: RSET before reuse
        if self._chunking:
            self._owed.append((Stage.BDAT, -1))
            chunk = crlf_lines(self._data)
            return Send(b"BDAT %d LAST\r\n" % len(chunk) + chunk, 1)
        self._owed.append((Stage.DATA, -1))
        return Send(b"DATA\r\n", 1)

    def _after_data_reply(self, reply: Reply) -> Step:
        wanted = self._accepted and not self._mail_refused
        if reply.code == 354 and self._lmtp:
            if not wanted:  # RFC 2033 4.2 says 503 here: a server that says 354 is not trusted further
                return self._finish(clean=False, closing=True)
            self._owed.extend((Stage.MESSAGE, i) for i in range(len(self._accepted)))
            return Send(message_bytes(self._data), len(self._accepted))
        if reply.code == 354:
            self._owed.append((Stage.MESSAGE, -1) if wanted else (Stage.EMPTY, -1))
            return Send(message_bytes(self._data) if wanted else b".\r\n", 1)
        if wanted:
            self._replies.update((r, reply) for r in self._accepted)
        return self._finish(clean=False)

    def _finish(self, *, clean: bool, closing: bool = False, rest: Reply | None = None) -> Finished:
        if rest is not None:
            self._replies.update((r, rest) for r in self._recipients if r not in self._replies)
        missing = [r for r in self._recipients if r not in self._replies]
        if missing:  # pragma: no cover - every path above decides every recipient
            raise AssertionError(f"{len(missing)} recipient(s) without a reply")
        closing = closing or bool(self._owed)
        self._owed.clear()
        self._finished = Finished({r: self._replies[r] for r in self._recipients}, clean, closing)
        return self._finished
