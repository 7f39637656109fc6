"""Issue 14, mailboxes across nodes: the LMTP transaction (RFC 2033) in the sans-I/O state
machine — a reply per accepted recipient after the message —, MAIL FROM's parameters, and
`[delivery] lmtp` in the config, the wiring and `check`'s text. Plain values, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildetour.config import ConfigError
from maildetour.config.model import LmtpServer
from maildetour.core.classify import classify_reply
from maildetour.core.hostport import HostPort
from maildetour.core.outcome import Delivered, PermanentFailure, TemporaryFailure
from maildetour.delivery.lmtp import LmtpAgent
from maildetour.delivery.local import LocalAgent
from maildetour.delivery.smtp_pipeline import (
    NEED_REPLY,
    Finished,
    Parameters,
    Reply,
    Send,
    Stage,
    Transaction,
    Unsendable,
    parameters,
    sendable,
)
from maildetour.report import routing_table
from maildetour.wiring import mailbox_agent
from tests.configs import seed, seed_config

OK = Reply(250, "2.1.0 OK")
RCPT_OK = Reply(250, "2.1.5 OK")
NO_USER = Reply(550, "5.1.1 <b@d.test> User doesn't exist: b@d.test")
GO = Reply(354, "OK")
SAVED_A = Reply(250, "2.0.0 <a@d.test> QFw5G7XKCWuBFwAAg+zDdQ Saved")
SAVED_C = Reply(250, "2.0.0 <c@d.test> QFw5G7XKCWuBFwAAg+zDdQ:R3 Saved")
OVER_QUOTA = Reply(552, "5.2.2 <c@d.test> Quota exceeded (mailbox for user is full)")
NO_VALID = Reply(503, "5.5.0 No valid recipients")
CLOSING = Reply(421, "4.3.2 Shutting down")
DATA = b"Received: from client.test\r\nSubject: x\r\n\r\n.dot\r\n"


def lmtp(*recipients: str, pipelining: bool = True) -> Transaction:
    return Transaction("s@x.test", recipients, [], data=DATA, utf8=False, pipelining=pipelining, lmtp=True)


def run(t: Transaction, replies: list[Reply]) -> tuple[list[Send], Finished]:
    """Answer `t` with `replies` in order; return its writes and how it ended."""
    first = t.start()
    writes, owed = [first], first.replies
    for i, reply in enumerate(replies):
        assert owed > 0, f"reply {i} was not asked for"
        owed -= 1
        step = t.receive(reply)
        if isinstance(step, Finished):
            assert i == len(replies) - 1, "finished before every reply was read"
            return writes, step
        if isinstance(step, Send):
            writes.append(step)
            owed += step.replies
        else:
            assert step is NEED_REPLY
    raise AssertionError(f"not finished; waiting for {t.waiting}")


def test_after_the_message_each_accepted_recipient_gets_its_own_reply_in_rcpt_order() -> None:
    t = lmtp("a@d.test", "b@d.test", "c@d.test")
    assert t.start() == Send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@d.test>\r\nRCPT TO:<b@d.test>\r\n"
                             b"RCPT TO:<c@d.test>\r\nDATA\r\n", 5)
    for reply in (OK, RCPT_OK, NO_USER, RCPT_OK):
        assert t.receive(reply) is NEED_REPLY
    # Two recipients were accepted: the message asks for two replies.
    assert t.receive(GO) == Send(b"Received: from client.test\r\nSubject: x\r\n\r\n..dot\r\n.\r\n", 2)
    assert t.waiting is Stage.MESSAGE
    assert t.receive(SAVED_A) is NEED_REPLY
    assert t.decided == {"a@d.test": SAVED_A, "b@d.test": NO_USER}
    assert t.waiting is Stage.MESSAGE
    assert t.receive(OVER_QUOTA) == Finished({"a@d.test": SAVED_A, "b@d.test": NO_USER, "c@d.test": OVER_QUOTA},
                                             clean=True, closing=False)
    assert t.waiting is None


@pytest.mark.parametrize("pipelining", [True, False])
def test_pipelined_and_lock_step_lmtp_decide_alike(pipelining: bool) -> None:
    replies = [OK, RCPT_OK, RCPT_OK, GO, SAVED_A, SAVED_C]
    writes, end = run(lmtp("a@d.test", "c@d.test", pipelining=pipelining), replies)
    assert end == Finished({"a@d.test": SAVED_A, "c@d.test": SAVED_C}, clean=True, closing=False)
    assert len(writes) == (2 if pipelining else 5)  # MAIL, RCPT, RCPT, DATA one by one in lock-step
    assert writes[-1].replies == 2


def test_one_recipient_alone_is_smtp_alike() -> None:
    _, end = run(lmtp("a@d.test"), [OK, RCPT_OK, GO, SAVED_A])
    assert end == Finished({"a@d.test": SAVED_A}, clean=True, closing=False)


def test_no_recipient_accepted_data_is_refused_and_nothing_more_is_sent() -> None:
    writes, end = run(lmtp("b@d.test"), [OK, NO_USER, NO_VALID])
    assert len(writes) == 1
    assert end == Finished({"b@d.test": NO_USER}, clean=False, closing=False)


def test_354_with_no_recipient_accepted_sends_nothing_and_closes() -> None:
    """RFC 2033 4.2: DATA must then fail with 503; a server that says 354 is not trusted with
    a "." whose count of replies nobody knows."""
    writes, end = run(lmtp("b@d.test"), [OK, NO_USER, GO])
    assert len(writes) == 1
    assert end == Finished({"b@d.test": NO_USER}, clean=False, closing=True)


def test_421_among_the_final_replies_decides_the_rest_and_closes() -> None:
    _, end = run(lmtp("a@d.test", "c@d.test"), [OK, RCPT_OK, RCPT_OK, GO, SAVED_A, CLOSING])
    assert end == Finished({"a@d.test": SAVED_A, "c@d.test": CLOSING}, clean=False, closing=True)


def test_refused_data_decides_every_accepted_recipient() -> None:
    later = Reply(451, "4.3.0 Temporary internal failure")
    _, end = run(lmtp("a@d.test", "c@d.test"), [OK, RCPT_OK, RCPT_OK, later])
    assert end == Finished({"a@d.test": later, "c@d.test": later}, clean=False, closing=False)


def test_what_is_decided_before_a_lost_connection_stays_decided() -> None:
    """The agent keeps `decided` when the connection is lost: a RCPT refusal before DATA's
    reply, and each final reply already read."""
    t = lmtp("a@d.test", "b@d.test", "c@d.test")
    t.start()
    for reply in (OK, RCPT_OK, NO_USER):
        t.receive(reply)
    assert t.decided == {"b@d.test": NO_USER}  # c's RCPT reply and DATA's never came
    for reply in (RCPT_OK, GO, SAVED_A):
        t.receive(reply)
    assert t.decided == {"a@d.test": SAVED_A, "b@d.test": NO_USER}


@pytest.mark.parametrize(("reply", "kind"), [
    (OVER_QUOTA, PermanentFailure),  # Dovecot's default: our policy (detour, DSN, quarantine)
    (Reply(452, "4.2.2 <c@d.test> Quota exceeded (mailbox for user is full)"), TemporaryFailure),  # quota_full_tempfail
    (NO_USER, PermanentFailure),
    (SAVED_A, Delivered),
])
def test_the_stores_replies_become_outcomes(reply: Reply, kind: type) -> None:
    outcome = classify_reply(reply.code, reply.text)
    assert isinstance(outcome, kind)
    assert getattr(outcome, "alert", False) == (reply is NO_USER)  # an unknown mailbox: the operator looks


def test_parameters_for_the_offered_extensions() -> None:
    dovecot = {"8bitmime": "", "chunking": "", "enhancedstatuscodes": "", "pipelining": ""}
    assert parameters(dovecot, "s@x.test", ["a@d.test"], b"x") == Parameters((), False)
    assert parameters(dovecot, "s@x.test", ["a@d.test"], "grüße".encode()) == Parameters(("BODY=8BITMIME",), False)
    # Dovecot 2.3's LMTP offers no SIZE: none is sent (it answers SIZE= with 555 5.5.4).
    assert parameters({"size": "100"}, "s@x.test", ["a@d.test"], b"x") == Parameters(("SIZE=1",), False)
    too_big = parameters({"size": "100"}, "s@x.test", ["a@d.test"], b"x" * 101)
    assert isinstance(too_big, Unsendable) and (too_big.code, too_big.status) == (552, "5.3.4")
    no_utf8 = parameters(dovecot, "jörg@x.test", ["a@d.test"], b"x")
    assert isinstance(no_utf8, Unsendable) and (no_utf8.code, no_utf8.status) == (550, "5.6.7")
    assert parameters({"smtputf8": ""}, "jörg@x.test", ["a@d.test"], b"x") == Parameters(("SMTPUTF8",), True)
    assert sendable("") and sendable("a@d.test") and not sendable("a b@d.test") and not sendable("a>@d")


# --- the config key ---------------------------------------------------------------------------
def multi_node(lmtp: str) -> str:
    """The seed as one of several nodes: no POP3 of ours, mailboxes by LMTP."""
    return seed(pop3=None, delivery_extra=f'lmtp = "{lmtp}"')


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:24", LmtpServer(address=HostPort("127.0.0.1", 24))),
    ("[::1]:24", LmtpServer(address=HostPort("::1", 24))),
    ("mailstore.internal:24", LmtpServer(address=HostPort("mailstore.internal", 24))),
    ("unix:/run/dovecot/lmtp", LmtpServer(socket=Path("/run/dovecot/lmtp"))),
])
def test_lmtp_takes_host_port_or_a_unix_socket(tmp_path: Path, value: str, expected: LmtpServer) -> None:
    config = seed_config(tmp_path, multi_node(value))
    assert config.delivery.lmtp == expected
    assert str(config.delivery.lmtp) == (value if value.startswith("unix:") else str(expected.address))


def test_a_relative_socket_is_relative_to_the_config_file(tmp_path: Path) -> None:
    config = seed_config(tmp_path, multi_node("unix:run/lmtp"))
    assert config.delivery.lmtp == LmtpServer(socket=(tmp_path / "run" / "lmtp").resolve())


@pytest.mark.parametrize("value", ["unix:", "127.0.0.1", "127.0.0.1:0", "/run/dovecot/lmtp", "lmtp://x:24"])
def test_a_bad_lmtp_value_names_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        seed_config(tmp_path, multi_node(value))
    assert str(caught.value).startswith("delivery.lmtp: ")
    if value.startswith("/"):
        assert 'written "unix:/run/dovecot/lmtp"' in str(caught.value)


def test_lmtp_and_a_pop3_listener_of_ours_do_not_go_together(tmp_path: Path) -> None:
    """Our Maildirs would stay empty: POP3 and IMAP are the mail store's to serve."""
    with pytest.raises(ConfigError) as caught:
        seed_config(tmp_path, seed(delivery_extra='lmtp = "unix:/run/dovecot/lmtp"'))
    assert str(caught.value).startswith("pop3.listen: the mailboxes are stored by the LMTP server "
                                        '(delivery.lmtp = "unix:/run/dovecot/lmtp")')
    text = seed(pop3=None, delivery_extra='lmtp = "127.0.0.1:24"').replace(
        "[delivery]", '[pop3]\nlisten_tls = ["127.0.0.1:995"]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n\n[delivery]')
    with pytest.raises(ConfigError) as caught:
        seed_config(tmp_path, text)
    assert str(caught.value).startswith("pop3.listen_tls: ")


def test_the_mailboxes_agent_is_lmtp_with_the_key_and_the_maildir_without(tmp_path: Path) -> None:
    assert isinstance(mailbox_agent(seed_config(tmp_path)), LocalAgent)
    config = seed_config(tmp_path, multi_node("unix:/run/dovecot/lmtp"))
    agent = mailbox_agent(config)
    assert isinstance(agent, LmtpAgent)
    assert agent.batch_key("ituki@pc.example.net") == agent.batch_key("ituki@gm.example.net") == ""


def test_check_says_where_the_mailboxes_are_stored(tmp_path: Path) -> None:
    text = routing_table(seed_config(tmp_path, multi_node("unix:/run/dovecot/lmtp")))
    assert "mailboxes (stored by the LMTP server unix:/run/dovecot/lmtp, which (or its IMAP/POP3 server) " \
           "serves them):" in text
    assert "ituki@pc.example.net (mailbox by LMTP to unix:/run/dovecot/lmtp)" in text
    assert "detour ituki@gm.example.net (mailbox by LMTP to unix:/run/dovecot/lmtp)" in text
    one_node = routing_table(seed_config(tmp_path))
    assert "mailboxes (Maildirs in the state dir):" in one_node and "(local mailbox)" in one_node
