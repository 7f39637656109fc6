"""What one delivery attempt came to, and what happens next.

Pure: values only, no I/O. Delivery agents report an `Outcome` per copy; `core.policy` turns it
into a `Decision`. Exposure: internal. Replies from remote hosts are kept verbatim here (they are
private: only the operator sees them); anything that can reach a sender goes through
`core.redact` first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Delivered:
    """The next hop (or the local mailbox) took responsibility for the copy."""

    reply: str


@dataclass(frozen=True, slots=True)
class TemporaryFailure:
    """Try again later: 4xx replies, timeouts, dropped connections, unclassified errors."""

    reply: str


@dataclass(frozen=True, slots=True)
class PermanentFailure:
    """The destination refused the copy for good (5xx). `alert` marks replies the operator
    should see (the destination mailbox does not exist: a config error on our side)."""

    reply: str
    alert: bool = False


@dataclass(frozen=True, slots=True)
class Unreachable:
    """No host to talk to: no MX/A record, null MX, connection refused, no route."""

    reason: str


Outcome = Delivered | TemporaryFailure | PermanentFailure | Unreachable
