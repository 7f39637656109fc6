"""Privacy: the redactor, the DSN, the Received header, loop and smuggling checks."""

from maildetour.core.dsn import build_dsn, failure
from maildetour.core.outcome import PermanentFailure, TemporaryFailure, Unreachable
from maildetour.core.received import count_received, find_message_id, has_bare_cr_or_lf, received_header
from maildetour.core.redact import Redactor

PRIVATE = Redactor(frozenset({"ituki-ex@gmail.com", "friend@example.org"}))


def test_the_redactor_removes_private_addresses_in_any_case_and_bare_local_parts() -> None:
    text = "550 5.1.1 <Ituki-Ex@GMAIL.com>: no such user; see ituki-ex and FRIEND@example.org"
    scrubbed = PRIVATE.scrub(text)
    assert not PRIVATE.leaks(scrubbed)
    assert "ituki-ex" not in scrubbed.lower() and "friend@" not in scrubbed.lower()
    assert scrubbed.startswith("550 5.1.1 <[private]>")


def test_a_dsn_names_only_the_public_address_and_quotes_only_the_public_fields() -> None:
    original = (b"Received: from x\r\nFrom: a@sender.example\r\nTo: ituki@example.com\r\n"
                b"Subject: hi friend@example.org\r\n\r\nbody\r\n")
    refusal = PermanentFailure("550 5.1.1 <friend@example.org> does not exist", 550, "5.1.1",
                               "no such mailbox")
    dsn = build_dsn(
        hostname="mx.example.com", sender="a@sender.example",
        failure=failure("Q1", "ituki@example.com", refusal, 1.0),
        original=original, redactor=PRIVATE, now=2.0,
    ).decode()
    assert "friend@example.org" not in dsn.lower() and "ituki-ex" not in dsn.lower()
    assert "Final-Recipient: rfc822; ituki@example.com" in dsn
    assert "Status: 5.1.1" in dsn and "Action: failed" in dsn
    assert "no such mailbox (550 5.1.1)" in dsn and "does not exist" not in dsn
    assert "multipart/report; report-type=delivery-status" in dsn
    assert "To: <a@sender.example>" in dsn
    assert "body" not in dsn.split("text/rfc822-headers")[1]  # headers only, no body


def test_a_dsn_reports_a_permanent_status_even_for_failures_that_lasted_too_long() -> None:
    refused = failure("Q1", "a@x.example", PermanentFailure("552 5.7.0 virus", 552, "5.7.0"), 1.0)
    assert (refused.code, refused.status) == (552, "5.7.0")
    expired = failure("Q1", "a@x.example", TemporaryFailure("451 4.3.0 later", 451, "4.3.0"), 1.0)
    assert (expired.code, expired.status) == (550, "5.0.0") and "longer than we retry" in expired.public
    unreachable = failure("Q1", "a@x.example", Unreachable("[192.0.2.1]:25: ECONNREFUSED"), 1.0)
    assert (unreachable.code, unreachable.status) == (550, "5.0.0")
    odd = failure("Q1", "a@x.example", PermanentFailure("5.7.1 odd", 421, "5.7.1"), 1.0)
    assert (odd.code, odd.status) == (550, "5.7.1")


def test_received_header_names_the_public_recipient_only_when_there_is_one() -> None:
    one = received_header(helo="client.example", client_ip="192.0.2.1", hostname="mx.example.com",
                          queue_id="Q1", protocol="ESMTP", recipients=("ituki@example.com",), now=0.0)
    assert one.startswith(b"Received: from client.example ([192.0.2.1])\r\n\tby mx.example.com")
    assert b"for <ituki@example.com>" in one and one.endswith(b"\r\n")
    two = received_header(helo="c", client_ip="192.0.2.1", hostname="mx.example.com", queue_id="Q1",
                          protocol="ESMTP", recipients=("a@example.com", "b@example.com"), now=0.0)
    assert b"for <" not in two


def test_received_headers_are_counted_in_the_header_block_only() -> None:
    data = b"Received: a\r\nreceived: b\r\nSubject: x\r\n\r\nReceived: in the body\r\n"
    assert count_received(data) == 2


def test_message_id_is_found_even_when_folded() -> None:
    assert find_message_id(b"Subject: x\r\nMessage-ID:\r\n <abc@d>\r\n\r\n") == "<abc@d>"
    assert find_message_id(b"Subject: x\r\n\r\nMessage-ID: <no@body>\r\n") == ""


def test_bare_cr_and_bare_lf_are_detected() -> None:
    assert not has_bare_cr_or_lf(b"a\r\nb\r\n")
    assert has_bare_cr_or_lf(b"a\nb\r\n")
    assert has_bare_cr_or_lf(b"a\rb\r\n")
    assert has_bare_cr_or_lf(b"a\r\n.\n\r\n")
