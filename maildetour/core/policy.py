"""Policy: what happens to a copy before and after an attempt. Values in, a decision out.

Pure (no I/O, no clock: `now` is passed in). Internal. The heart of the detour contract, over
the copy's detour chain (`core.destinations.detour_chain` of the target it started at):
  - delivered: done;
  - a step with a next step, refused for good (5xx) or unreachable: the next step at once;
  - the same with temporary failures lasting the step's deadline (`detour_after`): next step;
  - a copy that has passed a hidden destination is hidden from then on, and never bounced:
    when the last step refuses for good it is quarantined for the operator, and the last
    step's temporary failures are retried for as long as it takes (never lost);
  - an ordinary last step refused for good: a private DSN to the sender (or, for the null
    sender, just "failed"); temporary failures past the retry lifetime likewise;
  - anything else: retry with exponential backoff (never later than the step's deadline).
Before an attempt, `skipped` says whether a destination's `skip_when` conditions are met by a
message's inbound verdicts: such a copy is not tried and counts as refused (so it detours).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from maildetour.core.destinations import Destination, Step, detour_chain
from maildetour.core.outcome import Delivered, Outcome, PermanentFailure, TemporaryFailure, Unreachable


@dataclass(frozen=True, slots=True)
class RetryRules:
    first: float  # first retry this long after a temporary failure
    longest: float  # backoff doubles up to this
    lifetime: float  # ordinary copies failing this long are given up (bounced)


@dataclass(frozen=True, slots=True)
class Attempted:
    """What policy needs to know about the copy that was just tried."""

    target: str  # the step just tried
    origin: str  # the target the copy started at: its chain is this one's
    hidden: bool  # the copy has passed a hidden destination
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
    hidden: bool  # the copy is hidden from now on (it passed a hidden destination)


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
    not_before: float | None = None,
) -> Decision:
    """`not_before`: the copy's destination asked us to slow down until then (a retry comes
    no earlier, but never later than the step's deadline: waiting counts toward it)."""
    chain = detour_chain(destinations, copy.origin)
    here, after = chain.step(copy.target), chain.after(copy.target)
    dest = destinations.get(copy.target.lower())
    hidden = copy.hidden or (dest is not None and dest.hidden)
    match outcome:
        case Delivered():
            return Done()
        case PermanentFailure(reason=reason):
            return _give_up(after, hidden, copy.null_sender, outcome, f"refused: {reason}")
        case Unreachable(reason=reason) if after is not None:
            return _give_up(after, hidden, copy.null_sender, outcome, f"unreachable: {reason}")
        case Unreachable(reason=reason):
            return _temporary(copy, here, after, hidden, now, retry, outcome, f"unreachable: {reason}", not_before)
        case TemporaryFailure(reason=reason):
            return _temporary(copy, here, after, hidden, now, retry, outcome, f"deferred: {reason}", not_before)
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


def _give_up(after: Step | None, hidden: bool, null_sender: bool, outcome: Outcome,
             reason: str) -> Decision:
    if after is not None:
        return Detour(after.target, reason, hidden)
    if hidden:
        return Quarantine(f"last detour step failed: {reason}")
    if null_sender:
        return Fail(reason)
    return Bounce(reason, outcome)


def _temporary(
    copy: Attempted,
    here: Step,
    after: Step | None,
    hidden: bool,
    now: float,
    retry: RetryRules,
    outcome: Outcome,
    reason: str,
    not_before: float | None,
) -> Decision:
    first = copy.first_failure if copy.first_failure is not None else now
    waited = now - first
    limit = here.deadline if after is not None else None if hidden else retry.lifetime
    if limit is not None and waited >= limit:
        return _give_up(after, hidden, copy.null_sender, outcome, f"{reason} for {waited:.0f}s")
    at = now + min(retry.first * 2 ** max(copy.attempts - 1, 0), retry.longest)
    if not_before is not None:
        at = max(at, not_before)
    if limit is not None:
        at = min(at, first + limit)
    return Retry(at, first)
