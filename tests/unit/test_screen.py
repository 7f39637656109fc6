"""delivery.screen: copies whose destination's skip_when the verdicts meet are not tried."""

import asyncio

from maildetour.core.destinations import Destination
from maildetour.core.outcome import Delivered, PermanentFailure
from maildetour.delivery.base import Job
from maildetour.delivery.screen import ScreeningAgent
from tests.fakes import ScriptedAgent

OURS = "mx.example.com"
SKIPPY = Destination("skippy@gmail.com", hidden=True, detour="box@example.net", detour_after=600.0,
                     skip_when=("dmarc-fail",))


def deliver(results: str, *recipients: str) -> tuple[dict[str, object], ScriptedAgent]:
    inner = ScriptedAgent(lambda r, n: Delivered("250 ok"))
    agent = ScreeningAgent(inner, destinations={SKIPPY.address: SKIPPY}, authserv_id=OURS)
    data = f"Authentication-Results: {results}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    return dict(asyncio.run(agent.deliver(Job("Q1", "a@b.example", recipients, data, 1.0e9)))), inner


def test_a_copy_whose_skip_when_is_met_is_refused_without_being_tried() -> None:
    outcomes, inner = deliver(f"{OURS}; spf=pass; dkim=none; dmarc=fail", "skippy@gmail.com", "other@gmail.com")
    refusal = outcomes["skippy@gmail.com"]
    assert isinstance(refusal, PermanentFailure) and refusal.reason == "not tried: dmarc-fail (skip_when)"
    assert isinstance(outcomes["other@gmail.com"], Delivered)
    assert [j.recipients for j in inner.jobs] == [("other@gmail.com",)]


def test_only_our_own_verdicts_count() -> None:
    outcomes, inner = deliver("mx.other.example; dmarc=fail", "skippy@gmail.com")
    assert isinstance(outcomes["skippy@gmail.com"], Delivered)
    assert [j.recipients for j in inner.jobs] == [("skippy@gmail.com",)]


def test_when_every_copy_is_skipped_nothing_is_sent() -> None:
    outcomes, inner = deliver(f"{OURS}; dmarc=fail", "skippy@gmail.com")
    assert isinstance(outcomes["skippy@gmail.com"], PermanentFailure) and inner.jobs == []
