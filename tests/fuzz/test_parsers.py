"""Every parser of outside input, fed what Hypothesis makes up: it answers with a value or a clean
error, never an exception, and stays quick on big input. (Issue 10: "Bad inputs tried".)

Parsers: addresses (RCPT/MAIL arguments), SMTP reply classification, SRS decoding, late-bounce
(DSN) parsing, Received/Message-ID/smuggling checks, our Authentication-Results reading and
stripping, MTA-STS records and policies, POP3 commands (the sans-I/O session), and the config
loader (TOML and the tables it is made of). The wire-level SMTP fuzz is `test_smtp_wire.py`.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from maildetour.config import ConfigError
from maildetour.config.load import build_config
from maildetour.config.model import Pop3Settings
from maildetour.core.address import Address, AddressError, parse_address
from maildetour.core.authres import find_results, strip_our_results, verdict_words
from maildetour.core.bounce_report import BounceReport, parse_bounce
from maildetour.core.classify import classify_reply
from maildetour.core.mta_sts import StsError, StsPolicy, parse_policy, txt_id
from maildetour.core.outcome import Delivered, PermanentFailure, TemporaryFailure
from maildetour.core.received import count_received, find_message_id, has_bare_cr_or_lf
from maildetour.pop3.events import Close, Send
from maildetour.pop3.protocol import Pop3Session, State
from maildetour.sign.srs import SrsCodec, SrsError

NOW = 1_795_000_000.0
CODEC = SrsCodec([b"fuzz-secret"], "example.com", hash_length=8)
# Text a client or a remote server might send: any Unicode, weighted toward the characters that
# matter to these parsers.
TRICKY = st.text(alphabet=st.sampled_from('@<>:;,"\\()[]%!.=+- \t\r\n\x00abcXYZ019é中') | st.characters(),
                 max_size=300)


@given(TRICKY)
@example("<@relay.example:ituki@example.com>")
@example('"ituki"@example.com')
@example("(c)@relay.example:ituki@example.com")
@example("ituki@[127.0.0.1]")
@example("a@b.c" + "x" * 300)
def test_an_address_is_an_address_or_a_reason(text: str) -> None:
    parsed = parse_address(text)
    assert isinstance(parsed, (Address, AddressError))
    if isinstance(parsed, Address):  # what we accept parses again to itself
        assert parse_address(str(parsed)) == parsed
        assert "@" not in parsed.local and not any(c in str(parsed) for c in ' "<>()[]\\,;:\r\n')


@given(st.integers(min_value=-10, max_value=1000), TRICKY)
@example(250, "")
@example(550, "5.7.26 " + "x\n5.7.26 " * 500)
def test_any_reply_is_an_outcome(code: int, text: str) -> None:
    outcome = classify_reply(code, text)
    assert isinstance(outcome, (Delivered, TemporaryFailure, PermanentFailure))
    assert len(outcome.reason) <= 1000 and "\x00" not in outcome.reason
    assert outcome.status[0] == str(outcome.code)[0] or isinstance(outcome, TemporaryFailure)


@given(TRICKY)
@example("SRS0=abcdefgh=TT=example.org=alice@example.com")
@example("SRS1=abcd=first.test==xyz=TT=d=l@example.com")
@example("SRS0==TT=d=l@example.com")
def test_any_srs_address_reverses_or_says_why(text: str) -> None:
    result = CODEC.reverse(text, NOW)
    assert isinstance(result, (str, SrsError))


@given(st.from_regex(r"[a-z0-9._+-]{1,20}@[a-z0-9-]{1,10}\.[a-z]{2,5}", fullmatch=True))
def test_what_we_make_we_reverse(sender: str) -> None:
    assert CODEC.reverse(CODEC.forward(sender, NOW), NOW) == sender


def _dsn(failed: str, status: str, returned: str) -> bytes:
    """An RFC 3464 report as remote MTAs write them, with the parts' text made up."""
    return ("From: MAILER-DAEMON@x\r\nSubject: failure\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
            "--b\r\nContent-Type: text/plain\r\n\r\nit failed\r\n"
            "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n"
            f"Final-Recipient: rfc822; {failed}\r\nAction: failed\r\nStatus: {status}\r\n"
            f"\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n{returned}\r\n--b--\r\n"
            ).encode("utf-8", "replace")


@given(st.one_of(st.binary(max_size=5000),
                 st.builds(_dsn, TRICKY, TRICKY, TRICKY),
                 st.builds(lambda b, i, junk: b[:i] + junk + b[i:],
                           st.just(_dsn("ituki-ex@gmail.com", "5.7.1",
                                        "Received: by mx.example.com (maildetour) with ESMTP id 660F188AE693E6DEC;")),
                           st.integers(0, 600), st.binary(max_size=50))))
def test_any_report_is_parsed_into_a_bounded_report(data: bytes) -> None:
    report = parse_bounce(data, "mx.example.com")
    assert isinstance(report, BounceReport) and len(report.failed) <= 100


@given(st.binary(max_size=4000))
@example(b"Received: x\r\nReceived: y\r\n\r\nReceived: body\r\n")
@example(b"Message-ID:\r\n <a@b>\r\n\r\n")
@example(b"\r\n.\r\nMAIL FROM:<x@y>\r\n")
def test_received_message_id_and_smuggling_checks_take_any_bytes(data: bytes) -> None:
    assert count_received(data) >= 0
    assert isinstance(find_message_id(data), str) and len(find_message_id(data)) <= 998
    assert isinstance(has_bare_cr_or_lf(data), bool)


@given(st.binary(max_size=3000), TRICKY)
@example(b"Authentication-Results: mx.example.com; dmarc=pass\r\n\r\n", "mx.example.com")
@example(b'Authentication-Results: mx.example.com; spf=pass smtp.mailfrom="dmarc=pass@x"\r\n\r\n', "mx.example.com")
@example(b"", "\ud800")  # found by the long run: strip_our_results raised UnicodeEncodeError
def test_our_results_are_read_and_stripped_from_any_header(data: bytes, authserv: str) -> None:
    words = verdict_words(find_results(data, authserv or "x"))
    assert set(words) <= {"spf", "dkim", "dmarc", "arc"}
    stripped = strip_our_results(data, authserv or "x")
    assert strip_our_results(stripped, authserv or "x") == stripped  # nothing of ours is left


@given(st.lists(TRICKY, max_size=4), TRICKY)
@example(["v=STSv1; id=20260101;"], "version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 86400\n")
def test_mta_sts_records_and_policies_parse_or_say_why(texts: list[str], policy: str) -> None:
    assert isinstance(txt_id(texts), (str, StsError))
    assert isinstance(parse_policy(policy), (StsPolicy, StsError))


POP3_COMMAND = st.one_of(
    st.sampled_from(["CAPA", "USER x", "PASS y", "STAT", "LIST", "LIST 1", "UIDL", "RETR 1", "TOP 1 0",
                     "DELE 1", "RSET", "NOOP", "QUIT", "STLS", "AUTH PLAIN", "AUTH", "APOP a b", "LIST 99999999999999999999"]),
    st.text(max_size=60).filter(lambda s: "\n" not in s))


@given(st.lists(st.one_of(POP3_COMMAND.map(lambda c: c.encode("utf-8", "surrogatepass") + b"\r\n"),
                          st.binary(max_size=2000)), max_size=40))
def test_the_pop3_session_answers_any_bytes_and_closes_cleanly(chunks: list[bytes]) -> None:
    session = Pop3Session(settings=Pop3Settings(failed_login_delay=0), hostname="pop.example.test",
                          tls_active=False, tls_available=True, peer_is_loopback=True)
    session.greeting()
    for chunk in chunks:
        for effect in session.receive(chunk):
            if isinstance(effect, Send):
                assert effect.data[:3] in (b"+OK", b"-ER", b"+ \r") or effect.data.startswith(b"+ ")
        if session.state is State.CLOSED:
            assert session.receive(b"NOOP\r\n") == []
            break
        if session.state is not State.AUTHORIZATION and session.state is not State.TRANSACTION:
            break  # the wrapper would now check a login or start TLS: the fuzz stops there
    assert all(isinstance(e, (Send, Close)) or True for e in session.timed_out())


TOML_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False), TRICKY),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TRICKY, inner, max_size=4)),
    max_leaves=12)
KEYS = st.sampled_from(["server", "smtp", "pop3", "delivery", "mailbox", "forward", "destination", "signing",
                        "checks", "srs", "imap", "listen", "domains", "to", "detour", "hidden", "relay",
                        "password", "host", "user", "tls", "detour_after", "max_message_size"])
SEED = tomllib.loads((Path(__file__).resolve().parents[2] / "maildetour" / "seed.toml").read_text())


def _mutated(data: dict, path: list[str], value: object) -> dict:  # type: ignore[type-arg]
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value
    return data


@given(st.one_of(st.dictionaries(KEYS | TRICKY, TOML_VALUE, max_size=6),
                 st.builds(lambda path, value: _mutated(copy.deepcopy(SEED), path, value),
                           st.lists(KEYS, min_size=1, max_size=3), TOML_VALUE)))
def test_any_config_is_a_config_or_one_error_naming_a_key(raw: dict) -> None:  # type: ignore[type-arg]
    try:
        build_config(raw, Path("/nonexistent/maildetour.toml"))
    except ConfigError as exc:
        assert exc.key is not None and exc.reason
