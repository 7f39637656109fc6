"""Private delivery status notifications (RFC 3464) for ordinary forwards that failed for good.

Pure. The DSN goes to the original envelope sender, so everything in it faces the internet:
it names only the public address the sender used, never the forward target; of the outcome
it quotes only the reply code, the enhanced status and the outcome's public words, never the
private reason (a remote's text could quote the target in any form); and the original headers
are attached only after passing through the redactor. Never built for a null sender, a
hidden destination or a quarantined loop (policy sees to that).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime, make_msgid

from maildetour.core.outcome import Outcome
from maildetour.core.redact import Redactor

# Headers of the original are attached up to this size (RFC 3464 allows headers only).
MAX_ATTACHED_HEADERS = 16 * 1024


@dataclass(frozen=True, slots=True)
class Failure:
    queue_id: str
    recipient: str  # the public address the sender used
    code: int  # 5xx: a DSN reports a failure for good
    status: str  # 5.x.x
    public: str  # the outcome's public words
    arrival: float


def failure(queue_id: str, recipient: str, outcome: Outcome, arrival: float) -> Failure:
    """What a DSN may say about `outcome`. A temporary failure that lasted too long is
    reported as 550 5.0.0 (a failed DSN reports a permanent status)."""
    if outcome.status.startswith("5"):
        code = outcome.code if 500 <= outcome.code <= 599 else 550
        return Failure(queue_id, recipient, code, outcome.status, outcome.public, arrival)
    return Failure(queue_id, recipient, 550, "5.0.0", f"{outcome.public}, for longer than we retry",
                   arrival)


def build_dsn(
    *,
    hostname: str,
    sender: str,
    failure: Failure,
    original: bytes,
    redactor: Redactor,
    now: float,
) -> bytes:
    enhanced, code = failure.status, failure.code
    boundary = f"=_{failure.queue_id}_dsn"
    date = format_datetime(datetime.fromtimestamp(now, timezone.utc))
    arrival = format_datetime(datetime.fromtimestamp(failure.arrival, timezone.utc))
    headers = _original_headers(original, redactor)
    human = (
        f"This is the mail system at {hostname}.\r\n\r\n"
        f"Your message to <{failure.recipient}> could not be delivered.\r\n"
        f"It failed for good: {failure.public} ({code} {enhanced}).\r\n"
        f"Your message was not forwarded to that recipient; no further attempts will be made.\r\n"
    )
    report = (
        f"Reporting-MTA: dns; {hostname}\r\n"
        f"X-Queue-ID: {failure.queue_id}\r\n"
        f"Arrival-Date: {arrival}\r\n"
        f"\r\n"
        f"Final-Recipient: rfc822; {failure.recipient}\r\n"
        f"Action: failed\r\n"
        f"Status: {enhanced}\r\n"
        f"Diagnostic-Code: smtp; {code} {enhanced} (details withheld by the forwarder)\r\n"
    )
    parts = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: {make_msgid(domain=hostname)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        human,
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        report,
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
        headers,
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(parts).encode("utf-8", "replace")


def _original_headers(original: bytes, redactor: Redactor) -> str:
    end = original.find(b"\r\n\r\n")
    head = original[: end if end >= 0 else len(original)][:MAX_ATTACHED_HEADERS]
    return redactor.scrub(head.decode("utf-8", "replace")) + "\r\n"
