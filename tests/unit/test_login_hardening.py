"""Login hardening without sockets (issue 10): the throttle counts an attempt before its work
(#3), the POP3 state machine limits what a client may do before it logs in (#8), and an empty
password never opens a mailbox (#10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildetour.config import ConfigError, load_config
from maildetour.config.model import Pop3Settings
from maildetour.core.password import hash_password, verify_password
from maildetour.pop3.events import Close, Effect, LoginAccepted, LoginRefused, Send
from maildetour.pop3.protocol import Pop3Session, State
from maildetour.pop3.server import Pop3Account, _password_matches
from maildetour.pop3.throttle import LoginThrottle
from tests.configs import SEED, write_config


def session(**settings: object) -> Pop3Session:
    return Pop3Session(settings=Pop3Settings(**settings), hostname="pop.example.test",  # type: ignore[arg-type]
                       tls_active=False, tls_available=True, peer_is_loopback=True)


def text(effects: list[Effect]) -> str:
    return b"".join(e.data for e in effects if isinstance(e, Send)).decode()


# --- #3: the throttle counts an attempt before its password is checked -------------------------
def test_reservations_count_before_the_work_and_a_success_gives_its_back() -> None:
    """Issue 10 #3: attempts still being checked count; only a right password is given back."""
    throttle = LoginThrottle(per_client=3, per_mailbox=100, window=60, max_tracked=100)
    first = throttle.reserve("192.0.2.1", "box@x.test", now=0)
    second = throttle.reserve("192.0.2.1", "box@x.test", now=0)
    third = throttle.reserve("192.0.2.1", "box@x.test", now=0)
    assert first and second and third
    # Three checks in flight, none finished: the fourth is refused before any scrypt run.
    assert throttle.reserve("192.0.2.1", "box@x.test", now=0) is None
    assert throttle.blocked("192.0.2.1", "other@x.test", now=0)
    throttle.release(third)  # that one had the right password
    assert not throttle.blocked("192.0.2.1", "other@x.test", now=0)
    assert throttle.reserve("192.0.2.1", "box@x.test", now=1) is not None
    assert throttle.blocked("192.0.2.1", "box@x.test", now=1)


def test_releasing_a_forgotten_reservation_changes_nothing() -> None:
    throttle = LoginThrottle(per_client=2, per_mailbox=2, window=10, max_tracked=100)
    old = throttle.reserve("192.0.2.1", "box@x.test", now=0)
    assert old is not None
    assert not throttle.blocked("192.0.2.1", "box@x.test", now=20)  # window passed
    throttle.release(old)
    throttle.release(old)
    assert throttle.reserve("192.0.2.1", "box@x.test", now=21) is not None


# --- #8: limits before a login ---------------------------------------------------------------
def test_commands_without_a_login_attempt_are_limited() -> None:
    """Issue 10 #8: CAPA (or USER, STLS...) again and again does not keep a session open."""
    pop = session(max_commands_before_login=5)
    effects = pop.receive(b"CAPA\r\n" * 5)
    assert text(effects).count("+OK capability list follows") == 5 and pop.state is State.AUTHORIZATION
    effects = pop.receive(b"CAPA\r\n")
    assert text(effects) == "-ERR too many commands without a login, closing\r\n"
    assert effects[-1] == Close() and pop.state is State.CLOSED


def test_login_attempts_do_not_count_as_commands_without_progress() -> None:
    pop = session(max_commands_before_login=2, max_login_failures=10)
    for _ in range(4):  # AUTH PLAIN attempts are limited by max_login_failures instead
        effects = pop.receive(b"AUTH PLAIN !!\r\n")
        assert text(effects) == "-ERR [AUTH] authentication failed\r\n"
    effects = pop.receive(b"USER a@x.test\r\nPASS x\r\n")  # USER counts, PASS does not
    assert pop.state is State.LOGIN_PENDING
    text(pop.login_result(LoginRefused()))
    assert pop.receive(b"USER a@x.test\r\n") == [Send(b"+OK\r\n")]
    assert text(pop.receive(b"CAPA\r\n")).endswith("without a login, closing\r\n")


def test_a_login_resets_nothing_but_later_commands_are_not_counted() -> None:
    pop = session(max_commands_before_login=3)
    pop.receive(b"CAPA\r\nUSER a@x.test\r\nPASS x\r\n")
    assert text(pop.login_result(LoginAccepted(()))).startswith("+OK logged in")
    assert "+OK" in text(pop.receive(b"NOOP\r\n" * 10)) and pop.state is State.TRANSACTION


def test_expired_deadlines_close_with_a_reason_and_delete_nothing() -> None:
    pop = session()
    effects = pop.expired()
    assert text(effects) == "-ERR [AUTH] no login in time, closing\r\n" and effects[-1] == Close()
    assert pop.expired() == []
    pop = session()
    pop.receive(b"USER a@x.test\r\nPASS x\r\n")
    pop.login_result(LoginAccepted(()))
    effects = pop.expired()
    assert text(effects) == "-ERR [SYS/TEMP] session time limit reached, closing\r\n"
    assert all(isinstance(e, (Send, Close)) for e in effects)  # no Expunge


@pytest.mark.parametrize("name", ["max_unauthenticated_per_client", "max_commands_before_login",
                                  "login_timeout", "max_session_time", "password_workers", "io_workers"])
def test_new_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Pop3Settings(**{name: 0})  # type: ignore[arg-type]


# --- #10: an empty password opens nothing ----------------------------------------------------
def test_an_empty_mailbox_password_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    """Issue 10 #10: `password = ""` was accepted and then matched an empty PASS."""
    text = SEED.replace('password = "change-me"', 'password = ""')
    assert text != SEED
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, text))
    assert caught.value.key == 'mailbox."ituki@pc.example.net".password'
    assert "empty" in caught.value.reason


def test_an_empty_pass_never_matches_whatever_is_stored() -> None:
    """Issue 10 #10: not a hash of "", not an empty clear-text password (built in code)."""
    empty_hash = hash_password("")
    assert not verify_password(empty_hash, "")
    assert verify_password(hash_password("x"), "x")
    box = Path("/nonexistent")
    dummy = hash_password("unused")
    assert not _password_matches(Pop3Account("a@x.test", box, password_hash=empty_hash), "", dummy)
    assert not _password_matches(Pop3Account("a@x.test", box, password=""), "", dummy)
    assert not _password_matches(Pop3Account("a@x.test", box, password="secret"), "", dummy)
    assert _password_matches(Pop3Account("a@x.test", box, password="secret"), "secret", dummy)
    assert not _password_matches(None, "", dummy)
