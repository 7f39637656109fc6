"""Privacy: the redactor, the DSN, the Received header, loop and smuggling checks."""

from maildetour.core.dsn import Failure, build_dsn, status_of
from maildetour.core.received import count_received, find_message_id, has_bare_cr_or_lf, received_header
from maildetour.core.redact import Redactor

PRIVATE = Redactor(frozenset({"ituki-ex@gmail.com", "friend@example.org"}))


def test_the_redactor_removes_private_addresses_in_any_case_and_bare_local_parts() -> None:
    text = "550 5.1.1 <Ituki-Ex@GMAIL.com>: no such user; see ituki-ex and FRIEND@example.org"
    scrubbed = PRIVATE.scrub(text)
    assert not PRIVATE.leaks(scrubbed)
    assert "ituki-ex" not in scrubbed.lower() and "friend@" not in scrubbed.lower()
    assert scrubbed.startswith("550 5.1.1 <[private]>")


def test_a_dsn_names_only_the_public_address_and_keeps_only_status_codes() -> None:
    original = (b"Received: from x\r\nFrom: a@sender.example\r\nTo: ituki@example.com\r\n"
                b"Subject: hi friend@example.org\r\n\r\nbody\r\n")
    dsn = build_dsn(
        hostname="mx.example.com", sender="a@sender.example",
        failure=Failure("Q1", "ituki@example.com",
                        "refused: 550 5.1.1 <friend@example.org> does not exist", 1.0),
        original=original, redactor=PRIVATE, now=2.0,
    ).decode()
    assert "friend@example.org" not in dsn.lower() and "ituki-ex" not in dsn.lower()
    assert "Final-Recipient: rfc822; ituki@example.com" in dsn
    assert "Status: 5.1.1" in dsn and "Action: failed" in dsn
    assert "multipart/report; report-type=delivery-status" in dsn
    assert "To: <a@sender.example>" in dsn
    assert "body" not in dsn.split("text/rfc822-headers")[1]  # headers only, no body


def test_status_codes_default_to_a_permanent_failure() -> None:
    assert status_of("refused: 552 5.7.0 virus") == ("5.7.0", "552")
    assert status_of("deferred: 451 4.3.0 for 500000s") == ("5.0.0", "550")
    assert status_of("unreachable: no route") == ("5.0.0", "550")


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
