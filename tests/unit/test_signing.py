"""delivery.signing: the SRS and signing agents in front of SMTP, and what they do when they cannot."""

import asyncio
from pathlib import Path

import pytest

from maildetour.config.model import SigningConfig
from maildetour.core.outcome import Delivered
from maildetour.delivery.base import Job
from maildetour.delivery.signing import SigningAgent, SrsAgent, load_keys
from maildetour.sign.dkim import generate_key
from maildetour.sign.srs import SrsCodec
from maildetour.verify.dnsfunc import DnsLookup
from tests.fakes import ScriptedAgent

OURS = "example.com"


def deliver(agent: object, data: bytes, mail_from: str = "alice@sender.example") -> dict[str, object]:
    job = Job("Q1", mail_from, ("ituki-ex@gmail.com",), data, 1.0e9)
    return dict(asyncio.run(agent.deliver(job)))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("dkim")
    generate_key(folder / "k.pem")
    return load_keys(SigningConfig(OURS, "s1", folder / "k.pem"))


def test_a_message_dkim_cannot_sign_goes_out_unsigned_and_says_so(keys) -> None:  # type: ignore[no-untyped-def]
    """Issue 10 #1: "Subject : x" made signing raise outside any try; the copy looped silently."""
    inner = ScriptedAgent(lambda r, n: Delivered("250 ok"))
    agent = SigningAgent(inner, keys=keys, authserv_id="mx.example.com", clock=lambda: 1.0e9,
                         dnsfunc=DnsLookup(None, timeout=1.0))  # type: ignore[arg-type]
    data = b"From: a@sender.example\r\nSubject : x\r\n\r\nbody\r\n"
    outcomes = deliver(agent, data)
    [job] = inner.jobs
    assert job.data == data  # unsigned, untouched
    [outcome] = outcomes.values()
    assert isinstance(outcome, Delivered) and "sent without DKIM/ARC: signing failed" in outcome.reason


def test_a_signable_message_gets_a_signature_on_top(keys) -> None:  # type: ignore[no-untyped-def]
    inner = ScriptedAgent(lambda r, n: Delivered("250 ok"))
    agent = SigningAgent(inner, keys=keys, authserv_id="mx.example.com", clock=lambda: 1.0e9,
                         dnsfunc=DnsLookup(None, timeout=1.0))  # type: ignore[arg-type]
    data = b"From: a@sender.example\r\nSubject: x\r\n\r\nbody\r\n"
    deliver(agent, data)
    [job] = inner.jobs
    assert job.data.endswith(data) and b"DKIM-Signature: " in job.data[: -len(data)]


def test_the_envelope_sender_becomes_srs_and_the_null_sender_stays_null() -> None:
    inner = ScriptedAgent(lambda r, n: Delivered("250 ok"))
    agent = SrsAgent(inner, srs=SrsCodec([b"secret"], OURS, hash_length=8), clock=lambda: 1.0e9)
    deliver(agent, b"Subject: x\r\n\r\n")
    deliver(agent, b"Subject: x\r\n\r\n", mail_from="")
    assert inner.jobs[0].mail_from.startswith("SRS0=") and inner.jobs[0].mail_from.endswith("@example.com")
    assert len(inner.jobs[0].mail_from.split("=")[1]) == 8
    assert inner.jobs[1].mail_from == ""
