"""Policy: outcome in, decision out. The detour contract, with plain values."""

from maildetour.core.destinations import Destination
from maildetour.core.outcome import Delivered, PermanentFailure, TemporaryFailure, Unreachable
from maildetour.core.policy import (Attempted, Bounce, Detour, Done, Fail, Quarantine, Retry, RetryRules, decide,
                                    skipped)

HIDDEN = "ituki-ex@gmail.com"
DETOUR = "ituki@gm.example.net"
DESTS = {HIDDEN: Destination(HIDDEN, hidden=True, detour=DETOUR, detour_after=600.0)}
NO_DETOUR = {HIDDEN: Destination(HIDDEN, hidden=True, detour=None, detour_after=600.0)}
DELIVERY = RetryRules(first=60.0, longest=3600.0, lifetime=5 * 86400.0)
NOW = 1_000_000.0


def copy(target: str = HIDDEN, *, hidden_origin: bool = True, attempts: int = 1,
         first_failure: float | None = None, null_sender: bool = False) -> Attempted:
    return Attempted(target, hidden_origin, null_sender, attempts, first_failure)


def test_delivered_is_done() -> None:
    assert decide(copy(), Delivered("250 ok"), NOW, DESTS, DELIVERY) == Done()


def test_a_hidden_destination_refusing_for_good_detours_at_once() -> None:
    decision = decide(copy(), PermanentFailure("552 5.7.0 virus"), NOW, DESTS, DELIVERY)
    assert isinstance(decision, Detour) and decision.to == DETOUR


def test_an_unreachable_hidden_destination_detours_at_once() -> None:
    decision = decide(copy(), Unreachable("connection refused"), NOW, DESTS, DELIVERY)
    assert isinstance(decision, Detour) and decision.to == DETOUR


def test_temporary_failures_shorter_than_detour_after_are_retried_no_later_than_the_deadline() -> None:
    decision = decide(copy(attempts=5, first_failure=NOW - 500), TemporaryFailure("451 4.3.0"), NOW, DESTS, DELIVERY)
    assert decision == Retry(at=NOW + 100, first_failure=NOW - 500)


def test_the_first_temporary_failure_starts_the_clock() -> None:
    decision = decide(copy(), TemporaryFailure("421 4.7.0"), NOW, DESTS, DELIVERY)
    assert decision == Retry(at=NOW + 60, first_failure=NOW)


def test_temporary_failures_lasting_detour_after_detour() -> None:
    decision = decide(copy(first_failure=NOW - 600), TemporaryFailure("451 4.3.0"), NOW, DESTS, DELIVERY)
    assert isinstance(decision, Detour) and decision.to == DETOUR


def test_a_hidden_destination_without_detour_is_quarantined_never_bounced() -> None:
    assert isinstance(decide(copy(), PermanentFailure("550 5.7.26"), NOW, NO_DETOUR, DELIVERY), Quarantine)


def test_when_the_last_detour_target_fails_the_copy_is_quarantined() -> None:
    decision = decide(copy(DETOUR), PermanentFailure("550 5.1.1 gone"), NOW, DESTS, DELIVERY)
    assert isinstance(decision, Quarantine)


def test_an_ordinary_forward_target_refusing_for_good_bounces_privately_with_the_outcome() -> None:
    refusal = PermanentFailure("550 5.1.1 <friend@example.org> unknown", 550, "5.1.1")
    decision = decide(copy("friend@example.org", hidden_origin=False), refusal, NOW, DESTS, DELIVERY)
    assert isinstance(decision, Bounce) and decision.outcome == refusal


def test_a_dsn_that_fails_is_not_answered_with_another_dsn() -> None:
    decision = decide(copy("sender@example.org", hidden_origin=False, null_sender=True),
                      PermanentFailure("550 5.1.1"), NOW, DESTS, DELIVERY)
    assert isinstance(decision, Fail)


def test_ordinary_targets_retry_with_exponential_backoff_capped() -> None:
    ordinary = dict(hidden_origin=False, first_failure=NOW - 10)
    assert decide(copy("f@example.org", attempts=3, **ordinary), TemporaryFailure("451"), NOW, DESTS,
                  DELIVERY) == Retry(NOW + 240, NOW - 10)
    assert decide(copy("f@example.org", attempts=30, **ordinary), TemporaryFailure("451"), NOW, DESTS,
                  DELIVERY) == Retry(NOW + 3600, NOW - 10)


def test_ordinary_targets_unreachable_are_retried_until_max_lifetime_then_bounced() -> None:
    target = copy("f@example.org", hidden_origin=False, first_failure=NOW - 10)
    assert isinstance(decide(target, Unreachable("no route"), NOW, DESTS, DELIVERY), Retry)
    expired = copy("f@example.org", hidden_origin=False, first_failure=NOW - 5 * 86400)
    assert isinstance(decide(expired, Unreachable("no route"), NOW, DESTS, DELIVERY), Bounce)


def test_skip_when_is_met_by_the_first_condition_the_verdicts_meet() -> None:
    dest = Destination(HIDDEN, hidden=True, detour=DETOUR, detour_after=600.0,
                       skip_when=("spf-fail", "dmarc-fail", "dkim-fail"))
    refusal = skipped(dest, {"spf": "softfail", "dkim": "fail", "dmarc": "fail"})
    assert refusal is not None and refusal.reason == "not tried: dmarc-fail (skip_when)"
    assert refusal.status == "5.7.1" and "@" not in refusal.public


def test_skip_when_not_met_or_without_verdicts_means_try_it() -> None:
    dest = Destination(HIDDEN, hidden=True, detour=DETOUR, detour_after=600.0, skip_when=("spf-softfail",))
    assert skipped(dest, {"spf": "softfail"}) is not None
    assert skipped(dest, {"spf": "fail"}) is None
    assert skipped(dest, {}) is None  # no verdicts (checks off, temperror)
    assert skipped(None, {"spf": "softfail"}) is None
    assert skipped(Destination(HIDDEN, True, DETOUR, 600.0), {"spf": "softfail"}) is None


def test_a_skipped_hidden_copy_detours_like_a_refused_one() -> None:
    dest = Destination(HIDDEN, hidden=True, detour=DETOUR, detour_after=600.0, skip_when=("dmarc-fail",))
    refusal = skipped(dest, {"dmarc": "fail"})
    assert refusal is not None
    assert isinstance(decide(copy(), refusal, NOW, {HIDDEN: dest}, DELIVERY), Detour)
