"""Policy: outcome in, decision out. The detour contract over detour chains, with plain values."""

from maildetour.core.destinations import Destination, detour_chain
from maildetour.core.outcome import Delivered, PermanentFailure, TemporaryFailure, Unreachable
from maildetour.core.policy import (Attempted, Bounce, Detour, Done, Fail, Quarantine, Retry, RetryRules, decide,
                                    skipped)

HIDDEN = "ituki-ex@gmail.com"
IMAP = "imap:gmail"
DETOUR = "ituki@gm.example.net"
FRIEND = "friend@example.org"
DESTS = {HIDDEN: Destination(HIDDEN, hidden=True, detour=(DETOUR,), detour_after=600.0)}
CHAIN = {HIDDEN: Destination(HIDDEN, hidden=True, detour=(IMAP, DETOUR), detour_after=600.0)}
NO_DETOUR = {HIDDEN: Destination(HIDDEN, hidden=True, detour=(), detour_after=600.0)}
# An ordinary forward target whose detour is the hidden destination: hidden from there on.
THROUGH = {FRIEND: Destination(FRIEND, hidden=False, detour=(HIDDEN,), detour_after=60.0), **DESTS}
DELIVERY = RetryRules(first=60.0, longest=3600.0, lifetime=5 * 86400.0)
NOW = 1_000_000.0


def copy(target: str = HIDDEN, *, origin: str | None = None, hidden: bool = True, attempts: int = 1,
         first_failure: float | None = None, null_sender: bool = False) -> Attempted:
    return Attempted(target, origin or target, hidden, null_sender, attempts, first_failure)


def test_delivered_is_done() -> None:
    assert decide(copy(), Delivered("250 ok"), NOW, DESTS, DELIVERY) == Done()


def test_a_hidden_destination_refusing_for_good_detours_at_once_and_stays_hidden() -> None:
    decision = decide(copy(), PermanentFailure("552 5.7.0 virus"), NOW, DESTS, DELIVERY)
    assert isinstance(decision, Detour) and decision.to == DETOUR and decision.hidden


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


def test_the_steps_of_a_chain_are_tried_in_order() -> None:
    refused = decide(copy(), PermanentFailure("550 5.7.26 dmarc"), NOW, CHAIN, DELIVERY)
    assert isinstance(refused, Detour) and refused.to == IMAP
    no_room = decide(copy(IMAP, origin=HIDDEN), PermanentFailure("NO [OVERQUOTA]"), NOW, CHAIN, DELIVERY)
    assert isinstance(no_room, Detour) and no_room.to == DETOUR


def test_each_step_waits_out_the_destinations_detour_after_before_the_next() -> None:
    early = decide(copy(IMAP, origin=HIDDEN, first_failure=NOW - 300), TemporaryFailure("login failed"),
                   NOW, CHAIN, DELIVERY)
    assert early == Retry(at=NOW + 60, first_failure=NOW - 300)
    late = decide(copy(IMAP, origin=HIDDEN, first_failure=NOW - 600), TemporaryFailure("login failed"),
                  NOW, CHAIN, DELIVERY)
    assert isinstance(late, Detour) and late.to == DETOUR


def test_the_last_step_of_a_hidden_chain_keeps_retrying_and_is_never_bounced() -> None:
    for outcome in (TemporaryFailure("451 4.3.0 disk full"), Unreachable("no route")):
        decision = decide(copy(DETOUR, origin=HIDDEN, attempts=40, first_failure=NOW - 30 * 86400), outcome,
                          NOW, CHAIN, DELIVERY)
        assert decision == Retry(at=NOW + 3600, first_failure=NOW - 30 * 86400)


def test_when_the_last_step_refuses_for_good_the_copy_is_quarantined() -> None:
    decision = decide(copy(DETOUR, origin=HIDDEN), PermanentFailure("550 5.1.1 gone"), NOW, CHAIN, DELIVERY)
    assert isinstance(decision, Quarantine)


def test_a_hidden_destination_without_detour_is_quarantined_never_bounced() -> None:
    assert isinstance(decide(copy(), PermanentFailure("550 5.7.26"), NOW, NO_DETOUR, DELIVERY), Quarantine)


def test_hidden_is_inherited_by_everything_after_a_hidden_step() -> None:
    # An ordinary target refuses: its detour is the hidden destination; the copy is hidden now.
    first = decide(copy(FRIEND, hidden=False), PermanentFailure("550 5.1.1"), NOW, THROUGH, DELIVERY)
    assert isinstance(first, Detour) and first.to == HIDDEN and not first.hidden
    second = decide(copy(HIDDEN, origin=FRIEND, hidden=False), PermanentFailure("552 virus"), NOW, THROUGH,
                    DELIVERY)
    assert isinstance(second, Detour) and second.to == DETOUR and second.hidden
    last = decide(copy(DETOUR, origin=FRIEND, hidden=second.hidden), PermanentFailure("550 5.2.2 full"), NOW,
                  THROUGH, DELIVERY)
    assert isinstance(last, Quarantine)  # never a bounce: the chain passed a hidden destination


def test_an_ordinary_forward_target_refusing_for_good_bounces_privately_with_the_outcome() -> None:
    refusal = PermanentFailure("550 5.1.1 <friend@example.org> unknown", 550, "5.1.1")
    decision = decide(copy(FRIEND, hidden=False), refusal, NOW, DESTS, DELIVERY)
    assert isinstance(decision, Bounce) and decision.outcome == refusal


def test_a_dsn_that_fails_is_not_answered_with_another_dsn() -> None:
    decision = decide(copy("sender@example.org", hidden=False, null_sender=True),
                      PermanentFailure("550 5.1.1"), NOW, DESTS, DELIVERY)
    assert isinstance(decision, Fail)


def test_ordinary_targets_retry_with_exponential_backoff_capped() -> None:
    ordinary = dict(hidden=False, first_failure=NOW - 10)
    assert decide(copy("f@example.org", attempts=3, **ordinary), TemporaryFailure("451"), NOW, DESTS,  # type: ignore[arg-type]
                  DELIVERY) == Retry(NOW + 240, NOW - 10)
    assert decide(copy("f@example.org", attempts=30, **ordinary), TemporaryFailure("451"), NOW, DESTS,  # type: ignore[arg-type]
                  DELIVERY) == Retry(NOW + 3600, NOW - 10)


def test_ordinary_targets_unreachable_are_retried_until_max_lifetime_then_bounced() -> None:
    target = copy("f@example.org", hidden=False, first_failure=NOW - 10)
    assert isinstance(decide(target, Unreachable("no route"), NOW, DESTS, DELIVERY), Retry)
    expired = copy("f@example.org", hidden=False, first_failure=NOW - 5 * 86400)
    assert isinstance(decide(expired, Unreachable("no route"), NOW, DESTS, DELIVERY), Bounce)


def test_the_chain_names_every_step_with_its_deadline_and_the_last_without() -> None:
    chain = detour_chain(THROUGH, FRIEND)
    assert [(s.target, s.deadline) for s in chain.steps] == [
        (FRIEND, 60.0), (HIDDEN, 600.0), (DETOUR, None)]
    assert chain.loop is None
    assert detour_chain(THROUGH, "someone@else.example").targets == ("someone@else.example",)


def test_skip_when_is_met_by_the_first_condition_the_verdicts_meet() -> None:
    dest = Destination(HIDDEN, hidden=True, detour=(DETOUR,), detour_after=600.0,
                       skip_when=("spf-fail", "dmarc-fail", "dkim-fail"))
    refusal = skipped(dest, {"spf": "softfail", "dkim": "fail", "dmarc": "fail"})
    assert refusal is not None and refusal.reason == "not tried: dmarc-fail (skip_when)"
    assert refusal.status == "5.7.1" and "@" not in refusal.public


def test_skip_when_not_met_or_without_verdicts_means_try_it() -> None:
    dest = Destination(HIDDEN, hidden=True, detour=(DETOUR,), detour_after=600.0, skip_when=("spf-softfail",))
    assert skipped(dest, {"spf": "softfail"}) is not None
    assert skipped(dest, {"spf": "fail"}) is None
    assert skipped(dest, {}) is None  # no verdicts (checks off, temperror)
    assert skipped(None, {"spf": "softfail"}) is None
    assert skipped(Destination(HIDDEN, True, (DETOUR,), 600.0), {"spf": "softfail"}) is None


def test_a_skipped_hidden_copy_detours_like_a_refused_one() -> None:
    dest = Destination(HIDDEN, hidden=True, detour=(DETOUR,), detour_after=600.0, skip_when=("dmarc-fail",))
    refusal = skipped(dest, {"dmarc": "fail"})
    assert refusal is not None
    assert isinstance(decide(copy(), refusal, NOW, {HIDDEN: dest}, DELIVERY), Detour)


def test_a_destination_asking_to_slow_down_delays_the_retry_but_never_past_the_deadline() -> None:
    later = decide(copy(first_failure=NOW - 100), TemporaryFailure("421 4.7.28"), NOW, DESTS, DELIVERY,
                   not_before=NOW + 300)
    assert later == Retry(at=NOW + 300, first_failure=NOW - 100)
    capped = decide(copy(first_failure=NOW - 500), TemporaryFailure("421 4.7.28"), NOW, DESTS, DELIVERY,
                    not_before=NOW + 3000)
    assert capped == Retry(at=NOW + 100, first_failure=NOW - 500)  # the detour deadline comes first
