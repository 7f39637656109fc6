"""The POP3 state machine, fed bytes, answering with effects; plus its pure helpers (the
RETR/TOP encoder and the login throttle). No sockets, no files. Issue 3."""

from __future__ import annotations

import base64

import pytest

from maildetour.pop3.events import (
    CheckLogin, Close, Effect, Expunge, LoginAccepted, LoginInUse, LoginRefused,
    LoginUnavailable, Pop3Message, Send, SendMessage, StartTls)
from maildetour.pop3.protocol import Pop3Session, State
from maildetour.config.model import Pop3Settings
from maildetour.core.client_key import client_key
from maildetour.pop3.throttle import LoginThrottle
from maildetour.pop3.wire import MessageEncoder

MESSAGES = (Pop3Message("uid-a", 100), Pop3Message("uid-b", 250), Pop3Message("uid-c", 7))


def new_session(*, tls_active: bool = False, tls_available: bool = True, loopback: bool = True,
                **settings: object) -> Pop3Session:
    return Pop3Session(settings=Pop3Settings(**settings), hostname="pop.example.test",  # type: ignore[arg-type]
                       tls_active=tls_active, tls_available=tls_available,
                       peer_is_loopback=loopback)


def text(effects: list[Effect]) -> str:
    return b"".join(e.data for e in effects if isinstance(e, Send)).decode()


def logged_in(messages: tuple[Pop3Message, ...] = MESSAGES, **kw: object) -> Pop3Session:
    session = new_session(**kw)  # type: ignore[arg-type]
    assert session.receive(b"USER box@example.test\r\nPASS secret\r\n") == [
        Send(b"+OK\r\n"), CheckLogin("box@example.test", "secret")]
    assert text(session.login_result(LoginAccepted(messages))).startswith("+OK logged in, 3")
    return session


# --- AUTHORIZATION -------------------------------------------------------------------------
def test_greeting_names_the_host_and_no_version() -> None:
    assert new_session().greeting() == Send(b"+OK pop.example.test POP3 server ready\r\n")


def test_capa_lists_rfc_2449_capabilities_and_implementation_without_version() -> None:
    reply = text(new_session().receive(b"CAPA\r\n")).split("\r\n")
    assert reply[0].startswith("+OK")
    for capability in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER",
                       "SASL PLAIN", "STLS", "IMPLEMENTATION maildetour"):
        assert capability in reply
    assert reply[-2:] == [".", ""]


def test_user_pass_asks_the_wrapper_to_check_the_login() -> None:
    session = new_session()
    assert session.receive(b"user Box@Example.test\r\n") == [Send(b"+OK\r\n")]
    assert session.receive(b"PASS  two  spaces \r\n") == [
        CheckLogin("Box@Example.test", " two  spaces ")]
    assert session.state is State.LOGIN_PENDING


def test_pass_must_follow_user_immediately() -> None:
    session = new_session()
    assert text(session.receive(b"PASS x\r\n")) == "-ERR USER first\r\n"
    session.receive(b"USER a@b.test\r\nNOOP\r\n")
    assert text(session.receive(b"PASS x\r\n")) == "-ERR USER first\r\n"


def test_refused_login_says_auth_without_telling_whether_the_user_exists() -> None:
    session = new_session()
    session.receive(b"USER nobody@example.test\r\nPASS wrong\r\n")
    assert text(session.login_result(LoginRefused())) == "-ERR [AUTH] authentication failed\r\n"
    assert session.state is State.AUTHORIZATION


def test_in_use_and_unavailable_mailboxes_have_their_response_codes() -> None:
    session = new_session()
    session.receive(b"USER a@b.test\r\nPASS x\r\n")
    assert text(session.login_result(LoginInUse())).startswith("-ERR [IN-USE]")
    session.receive(b"USER a@b.test\r\nPASS x\r\n")
    assert text(session.login_result(LoginUnavailable())).startswith("-ERR [SYS/TEMP]")


def test_repeated_failed_logins_close_the_session() -> None:
    session = new_session(max_login_failures=3)
    for _ in range(2):
        session.receive(b"USER a@b.test\r\nPASS x\r\n")
        assert text(session.login_result(LoginRefused())).startswith("-ERR [AUTH]")
    session.receive(b"USER a@b.test\r\nPASS x\r\n")
    effects = session.login_result(LoginRefused())
    assert text(effects).startswith("-ERR [AUTH]") and effects[-1] == Close()
    assert session.receive(b"NOOP\r\n") == []


def test_pipelined_commands_wait_for_the_login_check() -> None:
    session = new_session()
    effects = session.receive(b"USER a@b.test\r\nPASS pw\r\nSTAT\r\nQUIT\r\n")
    assert effects[-1] == CheckLogin("a@b.test", "pw")
    after = session.login_result(LoginAccepted(MESSAGES))
    assert text(after).endswith("+OK 3 357\r\n")
    assert after[-1] == Expunge(())


def test_auth_plain_with_initial_response() -> None:
    token = base64.b64encode(b"\0box@example.test\0pa ss").decode()
    assert new_session().receive(f"AUTH PLAIN {token}\r\n".encode()) == [
        CheckLogin("box@example.test", "pa ss")]


def test_auth_plain_with_continuation_and_matching_authzid() -> None:
    session = new_session()
    assert session.receive(b"AUTH PLAIN\r\n") == [Send(b"+ \r\n")]
    token = base64.b64encode(b"Box@example.test\0box@example.test\0pw")
    assert session.receive(token + b"\r\n") == [CheckLogin("box@example.test", "pw")]


def test_auth_plain_rejects_other_authzid_bad_base64_and_cancel() -> None:
    session = new_session()
    other = base64.b64encode(b"admin@example.test\0box@example.test\0pw").decode()
    assert text(session.receive(f"AUTH PLAIN {other}\r\n".encode())).startswith("-ERR [AUTH]")
    assert text(session.receive(b"AUTH PLAIN !!notbase64\r\n")).startswith("-ERR [AUTH]")
    session.receive(b"AUTH PLAIN\r\n")
    assert text(session.receive(b"*\r\n")) == "-ERR authentication cancelled\r\n"
    assert text(session.receive(b"AUTH CRAM-MD5\r\n")).startswith("-ERR unsupported")
    assert text(session.receive(b"AUTH\r\n")) == "+OK\r\nPLAIN\r\n.\r\n"


def test_clear_text_login_needs_tls_unless_loopback_or_allowed() -> None:
    remote = new_session(loopback=False)
    caps = text(remote.receive(b"CAPA\r\n"))
    assert "USER" not in caps and "SASL" not in caps and "STLS" in caps
    assert text(remote.receive(b"USER a@b.test\r\n")).startswith("-ERR [AUTH] plaintext")
    assert text(remote.receive(b"AUTH PLAIN AGFAYgBj\r\n")).startswith("-ERR [AUTH] plaintext")
    assert new_session(loopback=False, tls_active=True).receive(b"USER a@b.test\r\n") == [
        Send(b"+OK\r\n")]
    allowed = new_session(loopback=False, allow_insecure_login=True)
    assert allowed.receive(b"USER a@b.test\r\n") == [Send(b"+OK\r\n")]


def test_stls_drops_pipelined_input_and_then_allows_login() -> None:
    session = new_session(loopback=False)
    effects = session.receive(b"STLS\r\nUSER injected@b.test\r\nPASS x\r\n")
    assert effects == [Send(b"+OK begin TLS negotiation\r\n"), StartTls()]
    assert session.tls_started() == []
    caps = text(session.receive(b"CAPA\r\n"))
    assert "STLS" not in caps and "USER" in caps
    assert text(session.receive(b"STLS\r\n")) == "-ERR STLS not available\r\n"


def test_stls_is_refused_without_a_certificate() -> None:
    session = new_session(tls_available=False)
    assert "STLS" not in text(session.receive(b"CAPA\r\n"))
    assert text(session.receive(b"STLS\r\n")) == "-ERR STLS not available\r\n"


def test_quit_in_authorization_closes_without_update() -> None:
    effects = new_session().receive(b"QUIT\r\n")
    assert text(effects).startswith("+OK") and effects[-1] == Close()


# --- TRANSACTION ---------------------------------------------------------------------------
def test_stat_list_and_uidl_describe_the_snapshot() -> None:
    session = logged_in()
    assert text(session.receive(b"STAT\r\n")) == "+OK 3 357\r\n"
    assert text(session.receive(b"LIST\r\n")) == (
        "+OK scan listing follows\r\n1 100\r\n2 250\r\n3 7\r\n.\r\n")
    assert text(session.receive(b"LIST 2\r\n")) == "+OK 2 250\r\n"
    assert text(session.receive(b"UIDL\r\n")) == (
        "+OK unique-id listing follows\r\n1 uid-a\r\n2 uid-b\r\n3 uid-c\r\n.\r\n")
    assert text(session.receive(b"uidl 3\r\n")) == "+OK 3 uid-c\r\n"


def test_retr_and_top_ask_the_wrapper_to_stream_the_message() -> None:
    session = logged_in()
    assert session.receive(b"RETR 2\r\n") == [SendMessage(1, b"+OK 250 octets\r\n", None)]
    assert session.receive(b"TOP 1 99999999\r\n") == [
        SendMessage(0, b"+OK top of message follows\r\n", 99999999)]
    assert session.receive(b"TOP 3 0\r\n")[0] == SendMessage(
        2, b"+OK top of message follows\r\n", 0)


def test_bad_message_numbers_are_errors() -> None:
    session = logged_in()
    for command in (b"RETR 0", b"RETR 4", b"RETR x", b"RETR", b"LIST -1", b"DELE 99",
                    b"TOP 1", b"TOP 1 -2", b"UIDL 1.5"):
        assert text(session.receive(command + b"\r\n")).startswith("-ERR"), command
    assert session.state is State.TRANSACTION


def test_dele_hides_the_message_until_rset() -> None:
    session = logged_in()
    assert text(session.receive(b"DELE 1\r\n")) == "+OK message 1 deleted\r\n"
    assert text(session.receive(b"DELE 1\r\n")) == "-ERR no such message\r\n"
    assert text(session.receive(b"RETR 1\r\n")) == "-ERR no such message\r\n"
    assert text(session.receive(b"STAT\r\n")) == "+OK 2 257\r\n"
    assert "1 uid-a" not in text(session.receive(b"UIDL\r\n"))
    assert text(session.receive(b"RSET\r\n")) == "+OK 3 357\r\n"
    assert text(session.receive(b"LIST 1\r\n")) == "+OK 1 100\r\n"


def test_deletions_happen_only_after_quit_in_update_state() -> None:
    session = logged_in()
    session.receive(b"DELE 3\r\nDELE 1\r\n")
    assert session.receive(b"QUIT\r\n") == [Expunge((0, 2))]
    assert session.state is State.UPDATE
    effects = session.expunged(0)
    assert effects == [Send(b"+OK bye, 1 messages left\r\n"), Close()]


def test_failed_expunge_is_reported() -> None:
    session = logged_in()
    session.receive(b"DELE 1\r\nQUIT\r\n")
    assert text(session.expunged(1)).startswith("-ERR [SYS/TEMP]")


def test_idle_timeout_closes_without_update() -> None:
    session = logged_in()
    session.receive(b"DELE 1\r\n")
    effects = session.timed_out()
    assert effects[-1] == Close() and not any(isinstance(e, Expunge) for e in effects)


def test_commands_in_the_wrong_state_are_refused() -> None:
    session = new_session()
    assert text(session.receive(b"STAT\r\n")) == "-ERR command not valid in this state\r\n"
    assert text(session.receive(b"RETR 1\r\n")) == "-ERR command not valid in this state\r\n"
    in_transaction = logged_in()
    assert text(in_transaction.receive(b"USER x\r\n")).startswith("-ERR command not valid")
    assert text(in_transaction.receive(b"STLS\r\n")).startswith("-ERR command not valid")


# --- bad input -----------------------------------------------------------------------------
def test_unknown_commands_and_binary_junk_get_err() -> None:
    session = new_session()
    assert text(session.receive(b"XYZZY\r\n")) == "-ERR unknown command\r\n"
    assert text(session.receive(b"\xff\xfe\x00\x01\r\n")) == "-ERR unknown command\r\n"
    assert text(session.receive(b"\r\n")) == "-ERR unknown command\r\n"
    assert text(session.receive(b"NOOP\r\n")) == "-ERR command not valid in this state\r\n"
    assert session.state is State.AUTHORIZATION


def test_overlong_line_gets_one_err_and_the_rest_of_it_is_ignored() -> None:
    session = new_session(max_line_length=64)
    assert text(session.receive(b"A" * 100)) == "-ERR line too long\r\n"
    assert session.receive(b"B" * 100) == []
    assert session.receive(b"CCC\r\n") == []
    assert text(session.receive(b"CAPA\r\n")).startswith("+OK")
    assert text(session.receive(b"NOOP " + b"x" * 80 + b"\r\n")) == "-ERR line too long\r\n"


def test_bare_lf_line_ends_are_accepted() -> None:
    assert text(new_session().receive(b"CAPA\n")).startswith("+OK capability")


def test_too_many_bad_commands_close_the_session() -> None:
    session = new_session(max_bad_commands=5)
    effects = session.receive(b"junk\r\n" * 6)
    assert text(effects).endswith("-ERR too many bad commands, closing\r\n")
    assert effects[-1] == Close() and session.state is State.CLOSED


def test_too_many_commands_close_the_session() -> None:
    session = logged_in(max_commands=10)
    effects = session.receive(b"NOOP\r\n" * 20)
    assert text(effects).count("+OK") == 10 - 2  # USER and PASS were counted too
    assert effects[-1] == Close()


# --- RETR/TOP encoding ---------------------------------------------------------------------
def encode(message: bytes, body_lines: int | None = None, chunk: int = 3) -> bytes:
    encoder = MessageEncoder(body_lines)
    out = b""
    for start in range(0, len(message), chunk):
        if encoder.done:
            break
        out += encoder.feed(message[start:start + chunk])
    return out + encoder.finish()


@pytest.mark.parametrize("chunk", [1, 2, 3, 1000])
def test_encoder_dot_stuffs_and_normalises_line_ends(chunk: int) -> None:
    message = b"Subject: x\n\n.hidden\r\n..two\nend"
    assert encode(message, chunk=chunk) == b"Subject: x\r\n\r\n..hidden\r\n...two\r\nend\r\n.\r\n"


def test_encoder_top_sends_header_blank_line_and_n_body_lines() -> None:
    message = b"A: 1\r\nB: 2\r\n\r\nline1\r\n.line2\r\nline3\r\n"
    assert encode(message, 0) == b"A: 1\r\nB: 2\r\n\r\n.\r\n"
    assert encode(message, 2) == b"A: 1\r\nB: 2\r\n\r\nline1\r\n..line2\r\n.\r\n"
    assert encode(message, 99999999) == encode(message)


def test_encoder_passes_a_huge_line_through_in_pieces() -> None:
    message = b"." + b"x" * 200_000 + b"\r\n.y\n"
    encoder = MessageEncoder()
    first = encoder.feed(message[:150_000])
    assert first.startswith(b"..x") and len(first) >= 100_000
    rest = encoder.feed(message[150_000:]) + encoder.finish()
    assert first + rest == b".." + b"x" * 200_000 + b"\r\n..y\r\n.\r\n"


# --- login throttle ------------------------------------------------------------------------
def test_throttle_blocks_a_client_after_its_failures_then_forgets() -> None:
    throttle = LoginThrottle(per_client=3, per_mailbox=100, window=60, max_tracked=100)
    for t in range(3):
        assert not throttle.blocked("192.0.2.1", f"user{t}@x.test", now=t)
        throttle.record_failure("192.0.2.1", f"user{t}@x.test", now=t)
    assert throttle.blocked("192.0.2.1", "other@x.test", now=10)
    assert not throttle.blocked("192.0.2.2", "other@x.test", now=10)
    assert not throttle.blocked("192.0.2.1", "other@x.test", now=62.5)


def test_throttle_blocks_a_mailbox_from_any_address_case_insensitively() -> None:
    throttle = LoginThrottle(per_client=100, per_mailbox=2, window=60, max_tracked=100)
    throttle.record_failure("192.0.2.1", "Box@X.test", now=0)
    throttle.record_failure("198.51.100.7", "box@x.test", now=1)
    assert throttle.blocked("203.0.113.9", "BOX@x.test", now=2)


def test_throttle_counts_an_ipv6_slash_64_as_one_client_and_stays_bounded() -> None:
    assert client_key("2001:db8:1:2::5") == client_key("2001:db8:1:2:ffff::1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    throttle = LoginThrottle(per_client=1, per_mailbox=1, window=60, max_tracked=4)
    for i in range(50):
        throttle.record_failure(f"10.0.0.{i}", f"u{i}", now=0)
    assert throttle.blocked("10.0.0.49", "fresh", now=1)
    assert not throttle.blocked("10.0.0.0", "fresh", now=1)  # forgotten: memory is bounded


def test_many_pipelined_bad_auth_lines_are_answered_without_recursion() -> None:
    session = new_session(max_login_failures=100_000, max_bad_commands=100_000)
    effects = session.receive(b"AUTH PLAIN !!\r\n" * 5000)
    assert text(effects).count("-ERR [AUTH]") == 5000
