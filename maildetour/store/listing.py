"""What the operator's queue tools ask the store and get back: a query, a listing, refusals.

Pure values (`maildetour queue list|show|delete|requeue`). A listing is one entry per message
with the copies that matched, each with its last reply (from the events) and the time its
attempt in flight started, if one is; the totals count everything that matched, also what the
limit left out. `InFlight` and `BytesGone` are the store's reasons for not making a change.
"""

from __future__ import annotations

from dataclasses import dataclass

from maildetour.store.records import Copy, CopyState, Event, Message

# What `maildetour queue` lists without --all or --state: copies not final.
UNFINISHED: tuple[CopyState, ...] = ("queued", "held", "quarantined")
# Events that carry a remote's reply (or our diagnosis) about one attempt: the "last reply".
REPLY_KINDS = ("delivered", "deferred", "refused")


@dataclass(frozen=True, slots=True)
class QueueQuery:
    """Filters combine (all must hold). A message is listed when one of its copies matches."""

    states: tuple[CopyState, ...] | None = UNFINISHED  # None: every state
    dest: str | None = None  # an address or imap:NAME (copies going there), or a domain (any address at it)
    received_before: float | None = None  # only messages received before this time (--older-than)
    limit: int = 10_000  # messages listed at most (the totals still count all)
    newest_first: bool = False  # else oldest first (the order they arrived in)


@dataclass(frozen=True, slots=True)
class ListedCopy:
    copy: Copy
    last_reply: Event | None  # the copy's latest delivered/deferred/refused event
    in_flight_since: float | None  # an attempt started then and has not reported yet


@dataclass(frozen=True, slots=True)
class ListedMessage:
    message: Message
    copies: tuple[ListedCopy, ...]  # the copies that matched, by id


@dataclass(frozen=True, slots=True)
class QueueListing:
    messages: tuple[ListedMessage, ...]
    matched_messages: int  # more than len(messages) when the limit cut the listing
    matched_copies: int
    matched_bytes: int  # sizes of the matched messages (each once)

    @property
    def truncated(self) -> bool:
        return self.matched_messages > len(self.messages)


@dataclass(frozen=True, slots=True)
class InFlight:
    """Refused: these copies are in a delivery attempt now (the server marked them)."""

    copies: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BytesGone:
    """Refused: the message's bytes are no longer kept, so there is nothing to deliver."""
