"""Policy: what happens to a copy before and after an attempt. Values in, a decision out.

Pure (no I/O, no clock: `now` is passed in). Internal. The heart of the detour contract:
  - delivered: done;
  - a destination with a `detour`, refused for good (5xx) or unreachable: detour at once;
  - the same with temporary failures lasting `detour_after`: detour;
  - a copy whose chain started at a hidden destination is never bounced: when the last target
    of its chain fails it is quarantined for the operator;
  - an ordinary target refused for good: a private DSN to the sender (or, for the null sender,
    just "failed"); temporary failures past the retry lifetime likewise;
  - anything else: retry with exponential backoff (never later than the detour deadline).
Before an attempt, `skipped` says whether a destination's `skip_when` conditions are met by a
message's inbound verdicts: such a copy is not tried and counts as refused (so it detours).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from maildetour.core.destinations import Destination
from maildetour.core.outcome import Delivered, Outcome, PermanentFailure, TemporaryFailure, Unreachable


@dataclass(frozen=True, slots=True)
class RetryRules:
    first: float  # first retry this long after a temporary failure
    longest: float  # backoff doubles up to this
    lifetime: float  # ordinary copies failing this long are given up (bounced)


@dataclass(frozen=True, slots=True)
class Attempted:
    """What policy needs to know about the copy that was just tried."""

    target: str
    hidden_origin: bool  # the copy's chain started at a hidden destination
    null_sender: bool  # MAIL FROM:<> (a DSN): never answered with another DSN
    attempts: int  # attempts at this target, including the one just made
    first_failure: float | None  # first temporary failure at this target, if any


@dataclass(frozen=True, slots=True)
class Done:
    pass


@dataclass(frozen=True, slots=True)
class Retry:
    at: float
    first_failure: float


@dataclass(frozen=True, slots=True)
class Detour:
    to: str
    reason: str


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: str


@dataclass(frozen=True, slots=True)
class Bounce:
    """Failure for good of an ordinary copy: tell the sender privately (see core.dsn), from
    the outcome's public fields only."""

    reason: str
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Fail:
    """Permanent failure where nobody may be told (a DSN that itself failed)."""

    reason: str


Decision = Done | Retry | Detour | Quarantine | Bounce | Fail


def decide(
    copy: Attempted,
    outcome: Outcome,
    now: float,
    destinations: Mapping[str, Destination],
    retry: RetryRules,
) -> Decision:
    dest = destinations.get(copy.target.lower())
    protected = copy.hidden_origin or (dest is not None and dest.hidden)
    match outcome:
        case Delivered():
            return Done()
        case PermanentFailure(reason=reason):
            return _give_up(dest, protected, copy.null_sender, outcome, f"refused: {reason}")
        case Unreachable(reason=reason) if dest is not None and (dest.detour or dest.hidden):
            return _give_up(dest, protected, copy.null_sender, outcome, f"unreachable: {reason}")
        case Unreachable(reason=reason):
            return _temporary(copy, dest, protected, now, retry, outcome, f"unreachable: {reason}")
        case TemporaryFailure(reason=reason):
            return _temporary(copy, dest, protected, now, retry, outcome, f"deferred: {reason}")
    raise AssertionError(f"unknown outcome {outcome!r}")


def skipped(dest: Destination | None, verdicts: Mapping[str, str]) -> PermanentFailure | None:
    """The refusal standing for a copy not tried because its destination's `skip_when` is met
    by the message's inbound verdicts ({"dmarc": "fail", ...}); None: try it."""
    for condition in dest.skip_when if dest is not None else ():
        method, _, result = condition.partition("-")
        if verdicts.get(method) == result:
            return PermanentFailure(f"not tried: {condition} (skip_when)", 550, "5.7.1",
                                    "not forwarded: the message failed authentication checks")
    return None


def _give_up(dest: Destination | None, protected: bool, null_sender: bool, outcome: Outcome,
             reason: str) -> Decision:
    if dest is not None and dest.detour:
        return Detour(dest.detour, reason)
    if protected:
        return Quarantine(f"last detour target failed: {reason}")
    if null_sender:
        return Fail(reason)
    return Bounce(reason, outcome)


def _temporary(
    copy: Attempted,
    dest: Destination | None,
    protected: bool,
    now: float,
    retry: RetryRules,
    outcome: Outcome,
    reason: str,
) -> Decision:
    first = copy.first_failure if copy.first_failure is not None else now
    waited = now - first
    deadline: float | None = None
    if dest is not None and (dest.detour or dest.hidden):
        if waited >= dest.detour_after:
            return _give_up(dest, protected, copy.null_sender, outcome, f"{reason} for {waited:.0f}s")
        deadline = first + dest.detour_after
    elif waited >= retry.lifetime:
        return _give_up(dest, protected, copy.null_sender, outcome, f"{reason} for {waited:.0f}s")
    backoff = min(retry.first * 2 ** max(copy.attempts - 1, 0), retry.longest)
    at = now + backoff
    if deadline is not None:
        at = min(at, deadline)
    return Retry(at, first)
