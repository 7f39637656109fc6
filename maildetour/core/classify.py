"""Remote SMTP reply -> delivery `Outcome`.

Pure: no I/O, no asyncio; takes a reply code and its text, returns a value. Exposure: pure
(the text comes from remote servers, so it is treated as untrusted: control characters are
removed and its length is capped before it becomes an outcome's private `reason`; the
outcome's `public` words are ours, from the table below or the kind's default). Never raises for any
input: a reply we cannot make sense of is a `TemporaryFailure` (unknown means temporary).

Order of decisions: a code outside 200..599 -> temporary; a named case (matched on the enhanced
status code, RFC 3463, when its class agrees with the reply code) -> its verdict; otherwise the
reply code's class: 2xx delivered, 4xx temporary, 5xx permanent, 3xx (out of place) temporary.
The named cases are mostly Gmail's; 5.1.1 ("no such mailbox") is marked for the operator
whichever host says it, because a forward to a mailbox that does not exist is a config error.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Mapping

from maildetour.core.outcome import (
    Delivered,
    Outcome,
    PermanentFailure,
    TemporaryFailure,
)

# A remote reply is stored for the operator; a hostile server could send a huge one.
MAX_REPLY_CHARS = 1000

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class Verdict(enum.Enum):
    TEMPORARY = "temporary"
    SLOW_DOWN = "slow down"  # temporary, and the whole destination should wait (rate limiting)
    PERMANENT = "permanent"
    ALERT = "alert"  # permanent, and the operator should look at it


@dataclass(frozen=True, slots=True)
class NamedReply:
    status: str  # enhanced status code, e.g. "5.7.26"
    verdict: Verdict
    meaning: str  # what the remote (Gmail) means by it


# The one table of replies we know by name. Kept as data: add a row, not an if.
NAMED_REPLIES: tuple[NamedReply, ...] = (
    # Gmail 550 5.7.26: the message fails the sender domain's DMARC policy, or is
    # unauthenticated (neither SPF nor DKIM passes). Typical for forwarded mail.
    NamedReply("5.7.26", Verdict.PERMANENT, "unauthenticated / fails DMARC"),
    # Gmail 5.7.0: refused for security or policy reasons (e.g. a blocked attachment type,
    # TLS or authentication required by the receiving domain's policy).
    NamedReply("5.7.0", Verdict.PERMANENT, "refused by security policy"),
    # Gmail 550 5.7.1: judged unsolicited / low reputation, or the recipient's or domain's
    # policy forbids the message.
    NamedReply("5.7.1", Verdict.PERMANENT, "blocked as likely spam or by policy"),
    # Gmail 421 4.7.28: unusual rate of unsolicited mail from our IP or domain; we are
    # rate limited for a while.
    NamedReply("4.7.28", Verdict.SLOW_DOWN, "rate limited: unusual rate of spam"),
    # Gmail 421/450 4.7.0: temporary policy deferral (suspicious message, missing
    # authentication, IP not yet trusted, TLS required); retry later.
    NamedReply("4.7.0", Verdict.TEMPORARY, "deferred by policy"),
    # Gmail 450 4.2.1: the recipient is receiving mail too fast; retry later.
    NamedReply("4.2.1", Verdict.SLOW_DOWN, "recipient receiving mail too fast"),
    # Gmail 451 4.3.0: the mail server temporarily rejected the message (internal trouble).
    NamedReply("4.3.0", Verdict.TEMPORARY, "temporary server problem"),
    # Gmail 421 4.4.5: server busy, try again later.
    NamedReply("4.4.5", Verdict.TEMPORARY, "server busy"),
    # Gmail 550 5.1.1: the account does not exist. Our forward points nowhere: alert.
    NamedReply("5.1.1", Verdict.ALERT, "no such mailbox"),
)

_BY_STATUS: Mapping[str, NamedReply] = {row.status: row for row in NAMED_REPLIES}

# The enhanced status of a reply that gives none (or one whose class disagrees with its code).
DEFAULT_STATUS = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}


def enhanced_status(text: str) -> str | None:
    """The RFC 3463 enhanced status code that begins `text` ("5.7.26"), or None."""
    match = _ENHANCED.match(text)
    if match is None:
        return None
    klass, subject, detail = match.groups()
    return f"{klass}.{int(subject)}.{int(detail)}"


def format_reply(code: int, text: str) -> str:
    """One line for the operator: "550 5.7.26 text ...", control characters removed, capped.

    Continuation lines that repeat the first line's enhanced code have it removed."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    status = enhanced_status(lines[0]) if lines else None
    if status is not None:
        prefix = re.compile(r"^" + re.escape(status) + r"\s*")
        lines = lines[:1] + [prefix.sub("", line) for line in lines[1:]]
    joined = _CONTROL.sub("", " ".join(lines))
    reply = f"{code} {joined}".strip()
    if len(reply) > MAX_REPLY_CHARS:
        reply = reply[: MAX_REPLY_CHARS - 3] + "..."
    return reply


def classify_reply(code: int, text: str) -> Outcome:
    """The outcome a remote server's reply `code` / `text` stands for. Never raises."""
    if not isinstance(code, int) or isinstance(code, bool) or not 200 <= code <= 599:
        return TemporaryFailure(format_reply(code if isinstance(code, int) else 0, text))
    reply = format_reply(code, text)
    status = enhanced_status(text)
    if status is None or status[0] != str(code // 100):
        status = DEFAULT_STATUS.get(code // 100, "4.0.0")  # absent, or disagrees with the code
    named = _BY_STATUS.get(status)
    if named is not None:
        match named.verdict:
            case Verdict.TEMPORARY:
                return TemporaryFailure(reply, code, status, named.meaning)
            case Verdict.SLOW_DOWN:
                return TemporaryFailure(reply, code, status, named.meaning, slow_down=True)
            case Verdict.PERMANENT:
                return PermanentFailure(reply, code, status, named.meaning)
            case Verdict.ALERT:
                return PermanentFailure(reply, code, status, named.meaning, alert=True)
    match code // 100:
        case 2:
            return Delivered(reply, code, status)
        case 5:
            return PermanentFailure(reply, code, status)
        case 4:
            return TemporaryFailure(reply, code, status)
        case _:  # 3xx where a final reply was expected
            return TemporaryFailure(reply, 451, "4.5.0", "unexpected reply from the receiving system")
