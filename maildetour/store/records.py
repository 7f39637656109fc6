"""What the store keeps: messages, copies (one per destination), events.

Pure values. A copy moves queued -> delivered | bounced | failed | quarantined; a detour keeps
the copy and changes its target (the event log keeps the path). The operator can hold a
queued copy (held -> queued by release), release a quarantined one, delete one that is not
final (deleted: kept for `trace`, never delivered), and requeue a quarantined, bounced or failed
one (queued again at its origin, the first target of its chain).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

CopyState = Literal["queued", "delivered", "bounced", "failed", "quarantined", "held", "deleted"]
# States a copy leaves only by the operator's hand, or never.
FINAL_STATES: tuple[CopyState, ...] = ("delivered", "bounced", "failed", "deleted")

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
    "alert",  # the operator should fix something (a destination says its mailbox does not exist)
    "late-bounce",  # a DSN to our SRS address, matched to the copy it reports on
    "held",  # the operator held queued copies (`maildetour queue hold`)
    "released",  # the operator queued held or quarantined copies again (`queue release`)
    "deleted",  # the operator deleted copies (`maildetour queue delete`)
    "flushed",  # the operator made queued copies due now (`maildetour queue flush`)
    "requeued",  # the operator sent finished-but-failed or quarantined copies back to their first target
]


@dataclass(frozen=True, slots=True)
class Message:
    queue_id: str
    mail_from: str  # "" for the null sender
    received_at: float
    message_id: str  # the Message-ID header, "" if none
    size: int
    client: str  # "helo [ip]"


@dataclass(frozen=True, slots=True)
class NewCopy:
    recipient: str  # public address the sender used
    target: str  # also the copy's origin: the start of its detour chain
    hidden: bool  # the target is a hidden destination
    state: CopyState = "queued"
    why: str = ""  # for a copy not born queued: the detail of its event (kind = its state)


@dataclass(frozen=True, slots=True)
class Copy:
    id: int
    queue_id: str
    mail_from: str
    recipient: str
    target: str  # the step of the detour chain the copy is at
    origin: str  # the target it started at (its chain is that one's)
    hidden: bool  # it has passed a hidden destination: no DSN about it, ever
    state: CopyState
    attempts: int  # attempts at the current target
    next_at: float
    first_failure: float | None  # first temporary failure at the current target
    detours: int
    received_at: float
    size: int = 0  # of the message's bytes (what an attempt holds in memory)


@dataclass(frozen=True, slots=True)
class DueCopies:
    """The queued copies due soonest (by due time, then id) and how many queued copies come
    after them: what the scheduler holds in memory, and what it leaves in the store."""

    copies: tuple[Copy, ...]
    later: int


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    queue_id: str
    copy_id: int | None
    kind: EventKind
    target: str
    detail: str


@dataclass(frozen=True, slots=True)
class Story:
    message: Message
    copies: tuple[Copy, ...]
    events: tuple[Event, ...]


def new_queue_id(now: float) -> str:
    """Sortable by time, unique enough: microseconds in hex plus 16 random bits."""
    return f"{int(now * 1_000_000):013X}{secrets.token_hex(2).upper()}"
