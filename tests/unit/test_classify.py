"""Remote SMTP replies become outcomes: the Gmail cases by name, then the reply code's class."""

from __future__ import annotations

import pytest

from maildetour.core.classify import (
    MAX_REPLY_CHARS,
    NAMED_REPLIES,
    classify_reply,
    enhanced_status,
    format_reply,
)
from maildetour.core.outcome import Delivered, PermanentFailure, TemporaryFailure

# Replies as Gmail words them (multi-line replies arrive joined by newlines, the code stripped).
GMAIL_DMARC = (
    "5.7.26 Unauthenticated email from example.org is not accepted due to\n"
    "5.7.26 domain's DMARC policy. Please contact the administrator of\n"
    "5.7.26 example.org domain if this was a legitimate mail."
)


@pytest.mark.parametrize(
    ("code", "text"),
    [(550, GMAIL_DMARC), (550, "5.7.0 Message blocked for security reasons"),
     (550, "5.7.1 Our system has detected that this message is likely unsolicited mail")],
)
def test_gmail_policy_refusals_are_permanent_without_alert(code: int, text: str) -> None:
    outcome = classify_reply(code, text)
    assert isinstance(outcome, PermanentFailure)
    assert outcome.alert is False


@pytest.mark.parametrize(
    ("code", "text"),
    [(421, "4.7.28 Our system has detected an unusual rate of unsolicited mail"),
     (421, "4.7.0 Try again later, closing connection."),
     (450, "4.2.1 The user you are trying to contact is receiving mail too quickly"),
     (451, "4.3.0 Mail server temporarily rejected message."),
     (421, "4.4.5 Server busy, try again later.")],
)
def test_gmail_deferrals_are_temporary(code: int, text: str) -> None:
    assert isinstance(classify_reply(code, text), TemporaryFailure)


def test_gmail_rate_limits_ask_the_whole_destination_to_slow_down() -> None:
    for code, text in ((421, "4.7.28 unusual rate of unsolicited mail"), (450, "4.2.1 receiving mail too quickly")):
        outcome = classify_reply(code, text)
        assert isinstance(outcome, TemporaryFailure) and outcome.slow_down
    assert not classify_reply(451, "4.3.0 Mail server temporarily rejected message.").slow_down  # type: ignore[union-attr]


def test_no_such_mailbox_is_permanent_and_alerts_the_operator() -> None:
    outcome = classify_reply(550, "5.1.1 The email account that you tried to reach does not exist.")
    assert outcome == PermanentFailure(
        "550 5.1.1 The email account that you tried to reach does not exist.", 550, "5.1.1",
        "no such mailbox", alert=True)


def test_an_outcome_carries_code_status_public_words_and_the_private_reply() -> None:
    outcome = classify_reply(550, GMAIL_DMARC)
    assert (outcome.code, outcome.status, outcome.public) == (550, "5.7.26", "unauthenticated / fails DMARC")
    assert outcome.reason.startswith("550 5.7.26 Unauthenticated email from example.org")
    # The public words are ours, whatever the remote said (it may quote a forward target).
    quoting = classify_reply(550, "5.1.0 <ituki-ex@gmail.com>: Recipient address rejected")
    assert (quoting.status, quoting.public) == ("5.1.0", "refused by the receiving system")
    assert "ituki-ex" in quoting.reason


def test_a_reply_without_an_enhanced_status_gets_its_class_default() -> None:
    assert classify_reply(554, "go away").status == "5.0.0"
    assert classify_reply(421, "closing").status == "4.0.0"
    assert classify_reply(450, "5.1.1 disagreeing").status == "4.0.0"


def test_every_named_case_has_a_meaning_and_a_class_matching_its_verdict() -> None:
    statuses = [row.status for row in NAMED_REPLIES]
    assert len(statuses) == len(set(statuses))
    for row in NAMED_REPLIES:
        assert row.meaning
        code = 550 if row.status.startswith("5") else 451
        outcome = classify_reply(code, row.status + " text")
        expected = PermanentFailure if row.status.startswith("5") else TemporaryFailure
        assert isinstance(outcome, expected), row


@pytest.mark.parametrize("code", [250, 251, 200, 299])
def test_2xx_is_delivered_with_the_reply_kept(code: int) -> None:
    assert classify_reply(code, "2.0.0 OK queued as 1234") == Delivered(f"{code} 2.0.0 OK queued as 1234",
                                                                         code, "2.0.0")


@pytest.mark.parametrize(("code", "text"), [(450, "mailbox busy"), (452, "4.2.2 over quota"),
                                            (421, "service not available")])
def test_other_4xx_is_temporary(code: int, text: str) -> None:
    assert isinstance(classify_reply(code, text), TemporaryFailure)


@pytest.mark.parametrize(("code", "text"), [(554, "5.7.1 relay denied"), (552, "5.3.4 too big"),
                                            (550, "no such user here"), (553, "")])
def test_other_5xx_is_permanent_without_alert(code: int, text: str) -> None:
    outcome = classify_reply(code, text)
    assert isinstance(outcome, PermanentFailure)
    assert outcome.alert is False


@pytest.mark.parametrize("code", [0, -1, 199, 600, 999, 354, 334, 100])
def test_odd_codes_are_temporary(code: int) -> None:
    assert isinstance(classify_reply(code, "whatever"), TemporaryFailure)


@pytest.mark.parametrize("text", ["", "\x00\xff garbage \r\n\r\n", "5.", "5.7.", "9.9.9 x", "5.7.2612 x"])
def test_garbage_text_falls_back_to_the_code_class(text: str) -> None:
    assert isinstance(classify_reply(550, text), PermanentFailure)
    assert isinstance(classify_reply(451, text), TemporaryFailure)


def test_enhanced_code_disagreeing_with_the_reply_code_is_ignored() -> None:
    # A 4xx saying 5.1.1 is still a temporary reply, and no alert.
    assert isinstance(classify_reply(450, "5.1.1 no such user"), TemporaryFailure)
    # A 5xx claiming a Gmail deferral code is still permanent.
    outcome = classify_reply(550, "4.7.28 rate limited")
    assert isinstance(outcome, PermanentFailure)


def test_enhanced_status_parsing() -> None:
    assert enhanced_status("5.7.26 Unauthenticated") == "5.7.26"
    assert enhanced_status("  4.2.1 slow down") == "4.2.1"
    assert enhanced_status("5.7.026 zero padded") == "5.7.26"
    assert enhanced_status("5.7.26.") == "5.7.26"
    assert enhanced_status("Please see 5.7.26") is None
    assert enhanced_status("3.0.0 wrong class") is None


def test_format_joins_multiline_replies_and_drops_repeated_status() -> None:
    reply = format_reply(550, GMAIL_DMARC)
    assert reply.startswith("550 5.7.26 Unauthenticated email from example.org")
    assert reply.count("5.7.26") == 1
    assert "\n" not in reply


def test_format_strips_control_characters_and_caps_length() -> None:
    reply = format_reply(550, "5.0.0 evil\x1b[31m\x00 text " + "x" * 5000)
    assert "\x1b" not in reply and "\x00" not in reply
    assert len(reply) <= MAX_REPLY_CHARS
    assert reply.endswith("...")
