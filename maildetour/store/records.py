"""What the store keeps: messages, copies (one per destination), events.

Pure values. A copy moves queued -> delivered | bounced | failed | quarantined; a detour keeps
the copy and changes its target (the event log keeps the path).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

CopyState = Literal["queued", "delivered", "bounced", "failed", "quarantined"]

EventKind = Literal[
    "accepted",  # message committed; detail: sender, client, size
    "delivered",  # an attempt succeeded; detail: remote reply
    "deferred",  # an attempt failed for now (4xx, timeout, unreachable); retry planned
    "refused",  # an attempt failed for good (5xx)
    "detoured",  # the copy now goes to its destination's detour target
    "quarantined",  # held for the operator (last detour failed, or a loop)
    "bounced",  # permanent failure of an ordinary copy; a DSN was queued
    "dsn-sent",  # the DSN's queue id (on the failed copy's message)
    "failed",  # permanent failure nobody may be told about (a DSN that failed)
    "alert",  # something the operator should fix (e.g. the target mailbox does not exist)
    "late-bounce",  # a DSN to our SRS address, matched to the copy it reports on
    "released",  # the operator queued quarantined copies again (`maildetour queue --release`)
]


@dataclass(frozen=True, slots=True)
class NewMessage:
    queue_id: str
    mail_from: str  # "" for the null sender
    received_at: float
    message_id: str  # the Message-ID header, "" if none
    size: int
    client: str  # "helo [ip]"


@dataclass(frozen=True, slots=True)
class NewCopy:
    recipient: str  # public address the sender used
    target: str
    hidden_origin: bool
    state: CopyState = "queued"


@dataclass(frozen=True, slots=True)
class Copy:
    id: int
    queue_id: str
    mail_from: str
    recipient: str
    target: str
    hidden_origin: bool
    state: CopyState
    attempts: int  # attempts at the current target
    next_at: float
    first_failure: float | None  # first temporary failure at the current target
    detours: int
    received_at: float


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    queue_id: str
    copy_id: int | None
    kind: EventKind
    target: str
    detail: str


@dataclass(frozen=True, slots=True)
class MessageInfo:
    queue_id: str
    mail_from: str
    received_at: float
    message_id: str
    size: int
    client: str


@dataclass(frozen=True, slots=True)
class Story:
    message: MessageInfo
    copies: tuple[Copy, ...]
    events: tuple[Event, ...]


def new_queue_id(now: float) -> str:
    """Sortable by time, unique enough: microseconds in hex plus 16 random bits."""
    return f"{int(now * 1_000_000):013X}{secrets.token_hex(2).upper()}"
