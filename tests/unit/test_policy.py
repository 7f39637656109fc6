"""Policy: outcome in, decision out. The detour contract, with plain values."""

from maildetour.config.model import DeliveryConfig, Destination
from maildetour.core.outcome import Delivered, PermanentFailure, TemporaryFailure, Unreachable
from maildetour.core.policy import Attempted, Bounce, Detour, Done, Fail, Quarantine, Retry, decide

HIDDEN = "ituki-ex@gmail.com"
DETOUR = "ituki@gm.example.net"
DESTS = {HIDDEN: Destination(HIDDEN, hidden=True, detour=DETOUR, detour_after=600.0)}
NO_DETOUR = {HIDDEN: Destination(HIDDEN, hidden=True, detour=None, detour_after=600.0)}
DELIVERY = DeliveryConfig(retry_first=60.0, retry_max=3600.0, max_lifetime=5 * 86400.0)
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


def test_an_ordinary_forward_target_refusing_for_good_bounces_privately() -> None:
    decision = decide(copy("friend@example.org", hidden_origin=False), PermanentFailure("550 5.1.1"),
                      NOW, DESTS, DELIVERY)
    assert isinstance(decision, Bounce)


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
