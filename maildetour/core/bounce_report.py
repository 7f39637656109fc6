"""Reading a DSN that comes back to one of our SRS addresses (a late bounce).

Pure. Faces the internet: the DSN is sender-controlled text, so nothing here trusts it beyond
finding (a) the recipients it says failed and (b) the queue ids of our own Received headers in
the returned message, which is how a report is matched to the copy it is about.

Only the report itself counts: delivery-status parts inside a returned message (whose body the
original sender wrote) are not read, and queue ids are taken from the returned headers only
(a text/rfc822-headers part, or the header section of a returned message/rfc822), never from
the report's prose or the returned body. Our Received line may have been refolded on the
way back, so any run of whitespace separates its words.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

# A DSN bigger than this is not a DSN we will parse (the returned message is cut anyway).
MAX_REPORT = 1024 * 1024
MAX_RECIPIENTS = 100
# Reports are two levels deep at most (multipart/mixed around multipart/report); deeper nesting
# is not a report, and stopping keeps the walk bounded.
MAX_DEPTH = 8


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str  # lowercased
    status: str  # "5.7.1"
    diagnostic: str


@dataclass(frozen=True, slots=True)
class BounceReport:
    failed: tuple[FailedRecipient, ...]
    queue_ids: tuple[str, ...]  # ours, from "by <hostname> (maildetour) with ... id <QID>"


def parse_bounce(data: bytes, hostname: str) -> BounceReport:
    data = data[:MAX_REPORT]
    ours = re.compile(r"\bby\s+" + re.escape(hostname) + r"\s+\(maildetour\)\s+with\s+\S+\s+id\s+([0-9A-F]{13,20})\b",
                      re.IGNORECASE)
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    failed: list[FailedRecipient] = []
    returned: list[str] = []
    for part in _report_parts(message):
        match part.get_content_type():
            case "message/delivery-status":
                failed += _failed_in(part)
            case "text/rfc822-headers":
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes):
                    returned.append(_header_section(payload.decode("utf-8", "replace")))
            case "message/rfc822":
                inner = part.get_payload()
                if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                    returned.append("".join(f"{k}: {v}\n" for k, v in inner[0].items()))
    queue_ids = tuple(dict.fromkeys(m.upper() for text in returned for m in ours.findall(text)))
    return BounceReport(tuple(failed[:MAX_RECIPIENTS]), queue_ids)


def _report_parts(message: Message, depth: int = 0) -> list[Message]:
    """The parts of the report, not descending into a returned message."""
    found = [message]
    if message.get_content_maintype() == "multipart" and depth < MAX_DEPTH:
        for part in message.get_payload():
            if isinstance(part, Message):
                found += _report_parts(part, depth + 1)
    return found


def _header_section(text: str) -> str:
    return re.split(r"\r?\n\r?\n", text, maxsplit=1)[0]


def _failed_in(part: Message) -> list[FailedRecipient]:
    groups = part.get_payload()
    if not isinstance(groups, list):
        return []
    found = []
    for group in groups[1:]:  # the first group is per-message, the rest per-recipient
        if not isinstance(group, Message):
            continue
        action = str(group.get("Action", "")).strip().lower()
        address = _address(str(group.get("Final-Recipient", ""))) or _address(
            str(group.get("Original-Recipient", "")))
        if action != "failed" or not address:
            continue
        found.append(FailedRecipient(address, str(group.get("Status", "5.0.0")).strip()[:16],
                                     " ".join(str(group.get("Diagnostic-Code", "")).split())[:300]))
    return found


def _address(field: str) -> str:
    """`rfc822; <a@b>` -> `a@b`."""
    value = field.partition(";")[2] if ";" in field else field
    return value.strip().strip("<>").lower()
