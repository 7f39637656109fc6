"""What one delivery attempt came to: outcomes as data.

Pure values, no I/O. Delivery agents report an `Outcome` per copy; `core.policy` turns it into
a `Decision`. Every outcome carries the same four facts (as maddy's SMTPError does):
  code    the SMTP reply code: the remote's, or ours for what got no reply (a timeout, a local
          check): 451 when it may work later, 550 when it never will;
  status  the enhanced status code (RFC 3463), "5.7.26";
  public  words safe for anyone, the sender included: our own fixed text, never a remote's
          reply text and never an address. A DSN quotes only `code`, `status` and `public`;
  reason  the private reason: the remote's reply as received (cleaned and capped by
          `core.classify`) or our own diagnosis. Operator-facing only (trace, audit log, server
          log): it may name a forward target or a hidden address.
and, for the server log, `relay`: where the agent delivered or tried (name[address]:port, an
IMAP account, "local"), "" when it never got that far; `connect`: seconds the attempt spent
before it could send (DNS, connecting, greeting, TLS, login; 0 on a reused connection), the
rest of the attempt being the transfer (Postfix's delays=.../c/d).
Exposure: internal. Constructors take the reason first; the defaults of the other fields are
the generic values of each kind (agents that know better set them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Delivered:
    """The next hop (or the local mailbox) took responsibility for the copy."""

    reason: str
    code: int = 250
    status: str = "2.0.0"
    public: str = "delivered"
    relay: str = ""
    connect: float = field(default=0.0, compare=False)  # a measurement, not part of what happened


@dataclass(frozen=True, slots=True)
class TemporaryFailure:
    """Try again later: 4xx replies, timeouts, dropped connections, unclassified errors.
    `slow_down`: the receiver says we send too fast (Gmail's 4.7.28, 4.2.1): the whole
    destination waits, not just this copy."""

    reason: str
    code: int = 451
    status: str = "4.0.0"
    public: str = "temporarily not accepted by the receiving system"
    slow_down: bool = False
    relay: str = ""
    connect: float = field(default=0.0, compare=False)  # a measurement, not part of what happened


@dataclass(frozen=True, slots=True)
class PermanentFailure:
    """The destination refused the copy for good (5xx). `alert` marks replies the operator
    should see (the destination mailbox does not exist: a config error on our side)."""

    reason: str
    code: int = 550
    status: str = "5.0.0"
    public: str = "refused by the receiving system"
    alert: bool = False
    relay: str = ""
    connect: float = field(default=0.0, compare=False)  # a measurement, not part of what happened


@dataclass(frozen=True, slots=True)
class Unreachable:
    """No host to talk to: connection refused, no route (RFC 3463 4.4.1: no answer from host)."""

    reason: str
    code: int = 451
    status: str = "4.4.1"
    public: str = "no mail host could be reached"
    relay: str = ""
    connect: float = field(default=0.0, compare=False)  # a measurement, not part of what happened


Outcome = Delivered | TemporaryFailure | PermanentFailure | Unreachable
