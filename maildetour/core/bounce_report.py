"""Reading a DSN that comes back to one of our SRS addresses (a late bounce).

Pure. Faces the internet: the DSN is sender-controlled text, so nothing here trusts it beyond
finding (a) the recipients it says failed and (b) the queue ids of our own Received headers in
the returned message, which is how a report is matched to the copy it is about.
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
    ours = re.compile(rb"by " + re.escape(hostname.encode()) + rb" \(maildetour\) with \S+ id ([0-9A-F]{13,20})")
    queue_ids = tuple(dict.fromkeys(m.decode() for m in ours.findall(data)))
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    failed: list[FailedRecipient] = []
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            failed += _failed_in(part)
    return BounceReport(tuple(failed[:MAX_RECIPIENTS]), queue_ids)


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
