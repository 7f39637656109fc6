"""core.authres (our Authentication-Results: forged ones removed, ours read back) and
core.bounce_report (late DSNs).

Both read text a sender controls, so beside the ordinary cases these tests try to make them
read a result or a queue id that is not really there.
"""

from __future__ import annotations

import pytest

from maildetour.core.authres import find_results, strip_our_results, verdict_words
from maildetour.core.bounce_report import MAX_RECIPIENTS, BounceReport, FailedRecipient, parse_bounce

OURS = "mx.example.com"
QID = "660F1C718DC73BAAA"
OTHER_QID = "660F1C718DC730000"
RECEIVED = (f"Received: from client.test ([127.0.0.1])\r\n\tby {OURS} (maildetour) with ESMTP id {QID}\r\n"
            "\tfor <ituki@example.com>;\r\n\tMon, 23 Nov 2026 13:41:07 +0000\r\n")


def stored(*results: str, body: str = "Hello.\r\n") -> bytes:
    fields = "".join(f"Authentication-Results: {r}\r\n" for r in results)
    return (f"{RECEIVED}{fields}From: a@sender.example\r\nSubject: s\r\n\r\n{body}").encode()


# -- find_results -----------------------------------------------------------------------------


def test_find_results_returns_our_header_unfolded() -> None:
    data = stored(f"{OURS};\r\n spf=pass smtp.mailfrom=a@sender.example;\r\n dmarc=none header.from=sender.example")
    assert find_results(data, OURS) == f"{OURS}; spf=pass smtp.mailfrom=a@sender.example; dmarc=none header.from=sender.example"


def test_find_results_ignores_other_authserv_ids_and_is_case_insensitive() -> None:
    data = stored("mx.elsewhere.example; dmarc=pass", "MX.Example.COM; spf=fail")
    assert find_results(data, OURS) == "MX.Example.COM; spf=fail"
    assert find_results(stored("mx.elsewhere.example; dmarc=pass"), OURS) is None
    assert find_results(stored(f"{OURS}.evil.example; dmarc=pass"), OURS) is None


def test_find_results_reads_headers_only() -> None:
    body = f"Authentication-Results: {OURS}; dmarc=pass\r\n"
    assert find_results(stored(body=body), OURS) is None


def test_arc_authentication_results_are_not_ours() -> None:
    data = f"ARC-Authentication-Results: i=1; {OURS}; dmarc=pass\r\nFrom: a@b\r\n\r\nx\r\n".encode()
    assert find_results(data, OURS) is None


# -- verdict_words ------------------------------------------------------------


def test_verdict_words_take_one_result_per_method() -> None:
    value = (f"{OURS}; spf=fail smtp.helo=client.test smtp.mailfrom=b@strict.example; "
             "dkim=pass header.d=signed.example; dmarc=fail (Used From Domain Record) "
             "header.from=strict.example policy.dmarc=reject; arc=none")
    assert verdict_words(value) == {"spf": "fail", "dkim": "pass", "dmarc": "fail", "arc": "none"}


def test_any_passing_dkim_signature_wins() -> None:
    value = f"{OURS}; dkim=fail reason=\"body hash mismatch\" header.d=a.example; dkim=pass header.d=b.example"
    assert verdict_words(value)["dkim"] == "pass"
    assert verdict_words(f"{OURS}; dkim=permerror; dkim=fail")["dkim"] == "permerror"


def test_no_header_or_no_results_gives_no_words() -> None:
    assert verdict_words(None) == {}
    assert verdict_words(f"{OURS}; none") == {}


@pytest.mark.parametrize("trick", [
    "smtp.mailfrom=dmarc=pass@strict.example",  # an unquoted local part may contain "="
    'smtp.mailfrom="a; dmarc=pass"@strict.example',  # a quoted one even ";"
    'smtp.helo="x.dmarc=pass"',
    'smtp.helo="\\"; dmarc=pass"',  # an escaped quote does not end the string
    "smtp.mailfrom=dkim=pass@strict.example",
])
def test_sender_chosen_text_inside_a_result_is_not_a_result(trick: str) -> None:
    value = f"{OURS}; spf=fail {trick}; dmarc=fail header.from=strict.example policy.dmarc=reject"
    assert verdict_words(value) == {"spf": "fail", "dmarc": "fail"}


def test_comments_and_versions_are_allowed_around_a_result() -> None:
    value = f"{OURS} 1; (first; comment) spf (checked) = softfail; dkim/1=pass; (x) dmarc=none"
    assert verdict_words(value) == {"spf": "softfail", "dkim": "pass", "dmarc": "none"}


STRIP_ID = "mx.fwd.example"


# -- strip_our_results ------------------------------------------------------------------------


def test_strip_removes_only_fields_claiming_our_id_and_keeps_all_other_bytes() -> None:
    head = (
        b"Received: from x by y; Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        b"Authentication-Results: MX.Fwd.Example;\r\n\tdkim=pass header.d=bank.example\r\n"
        b"authentication-results:mx.fwd.example; spf=pass\r\n"
        b"Authentication-Results: (forged) mx.fwd.example 1; dmarc=pass\r\n"
        b"Authentication-Results: mx.fwd.example.evil; spf=pass\r\n"
        b"Authentication-Results: mx.other.example; dkim=fail\r\n"
        b"ARC-Authentication-Results: i=1; mx.fwd.example; spf=pass\r\n"
        b"Subject: x  \r\n"
        b"\r\n"
    )
    body = b"Authentication-Results: mx.fwd.example; spf=pass\r\nbody\r\n"
    stripped = strip_our_results(head + body, STRIP_ID)
    assert stripped == (
        b"Received: from x by y; Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        b"Authentication-Results: mx.fwd.example.evil; spf=pass\r\n"
        b"Authentication-Results: mx.other.example; dkim=fail\r\n"
        b"ARC-Authentication-Results: i=1; mx.fwd.example; spf=pass\r\n"
        b"Subject: x  \r\n"
        b"\r\n"
    ) + body


def test_strip_handles_an_id_on_a_continuation_line_and_lf_messages() -> None:
    data = b"Authentication-Results:\n mx.fwd.example; spf=pass\nSubject: y\n\nbody\n"
    assert strip_our_results(data, STRIP_ID) == b"Subject: y\n\nbody\n"


def test_strip_leaves_a_message_without_our_results_byte_for_byte() -> None:
    data = b"From: a@b.example\r\nSubject: hi\r\n\r\nbody\r\nbare\rcr and trailing"
    assert strip_our_results(data, STRIP_ID) == data


# -- parse_bounce -----------------------------------------------------------------------------


def dsn(*recipients: tuple[str, str, str], returned: str = RECEIVED, returned_type: str = "text/rfc822-headers",
        prose: str = "Your message was not delivered.") -> bytes:
    groups = "".join(f"Final-Recipient: {final}\r\nAction: {action}\r\nStatus: {status}\r\n"
                     "Diagnostic-Code: smtp; 550 5.7.1\r\n  refused after acceptance\r\n\r\n"
                     for final, action, status in recipients)
    return (
        "From: mailer-daemon@gmail.com\r\nTo: SRS0=abcd=TT=sender.example=a@example.com\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        f"--b\r\nContent-Type: text/plain\r\n\r\n{prose}\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.gmail.com\r\n\r\n"
        f"{groups}"
        f"--b\r\nContent-Type: {returned_type}\r\n\r\n{returned}\r\n"
        "--b--\r\n"
    ).encode()


def test_a_dsn_names_its_failed_recipients_and_our_queue_id() -> None:
    report = parse_bounce(dsn(("rfc822; Ituki-Ex@gmail.com", "failed", "5.7.1")), OURS)
    assert report == BounceReport(
        (FailedRecipient("ituki-ex@gmail.com", "5.7.1", "smtp; 550 5.7.1 refused after acceptance"),),
        (QID,))


def test_only_failed_actions_count_and_original_recipient_stands_in() -> None:
    report = parse_bounce(dsn(("rfc822; a@gmail.com", "delayed", "4.4.7"),
                              ("rfc822; <b@gmail.com>", "failed", "5.1.1"),
                              ("", "failed", "5.0.0")), OURS)
    assert [f.address for f in report.failed] == ["b@gmail.com"]
    fallback = dsn(("rfc822; x", "failed", "5.1.1")).replace(b"Final-Recipient: rfc822; x",
                                                              b"Original-Recipient: rfc822; c@gmail.com")
    assert [f.address for f in parse_bounce(fallback, OURS).failed] == ["c@gmail.com"]


def test_a_returned_whole_message_works_like_returned_headers() -> None:
    whole = RECEIVED + "From: a@sender.example\r\nSubject: s\r\n\r\nbody\r\n"
    report = parse_bounce(dsn(("rfc822; ituki-ex@gmail.com", "failed", "5.7.1"), returned=whole,
                              returned_type="message/rfc822"), OURS)
    assert report.queue_ids == (QID,)
    assert [f.address for f in report.failed] == ["ituki-ex@gmail.com"]


def test_a_refolded_received_line_still_matches() -> None:
    refolded = (f"Received: from client.test ([127.0.0.1]) by {OURS}\r\n (maildetour)\r\n with ESMTP\r\n"
                f" id {QID} for <ituki@example.com>; Mon, 23 Nov 2026 13:41:07 +0000\r\n")
    assert parse_bounce(dsn(("rfc822; a@gmail.com", "failed", "5.7.1"), returned=refolded), OURS).queue_ids == (QID,)


def test_received_lines_of_other_hosts_and_other_software_do_not_match() -> None:
    theirs = RECEIVED.replace(OURS, "mx.other.example") + RECEIVED.replace("(maildetour)", "(Postfix)")
    assert parse_bounce(dsn(("rfc822; a@gmail.com", "failed", "5.7.1"), returned=theirs), OURS).queue_ids == ()


def test_queue_ids_come_from_the_returned_headers_only() -> None:
    """The prose of a report and the body of a returned message are anybody's text."""
    line = f"by {OURS} (maildetour) with ESMTP id {OTHER_QID}"
    whole = RECEIVED + f"From: a@sender.example\r\n\r\n{line}\r\n"
    report = parse_bounce(dsn(("rfc822; a@gmail.com", "failed", "5.7.1"), returned=whole,
                              returned_type="message/rfc822", prose=line), OURS)
    assert report.queue_ids == (QID,)


def test_a_delivery_status_inside_the_returned_message_is_not_part_of_the_report() -> None:
    """The returned message was written by the original sender: a report it contains is not
    the remote MTA's report and adds no failed recipients."""
    nested = dsn(("rfc822; ituki@pc.example.net", "failed", "5.7.1")).decode().replace('boundary="b"', 'boundary="n"')
    nested = nested.replace("--b", "--n")
    whole = RECEIVED + nested
    report = parse_bounce(dsn(("rfc822; ituki-ex@gmail.com", "failed", "5.7.1"), returned=whole,
                              returned_type="message/rfc822"), OURS)
    assert [f.address for f in report.failed] == ["ituki-ex@gmail.com"]


def test_not_a_report_gives_nothing() -> None:
    plain = f"From: x@y\r\nSubject: hi\r\n\r\n{RECEIVED}\r\nFinal-Recipient: rfc822; a@gmail.com\r\n".encode()
    assert parse_bounce(plain, OURS) == BounceReport((), ())
    assert parse_bounce(b"", OURS) == BounceReport((), ())
    assert parse_bounce(b"\xff\xfe garbage \r\n\r\n\x00", OURS) == BounceReport((), ())


def test_limits_hold_for_huge_and_deeply_nested_reports() -> None:
    many = dsn(*[(f"rfc822; u{i}@gmail.com", "failed", "5.1.1") for i in range(MAX_RECIPIENTS + 50)])
    assert len(parse_bounce(many, OURS).failed) == MAX_RECIPIENTS
    deep = b"".join(f'Content-Type: multipart/mixed; boundary="d{i}"\r\n\r\n--d{i}\r\n'.encode()
                    for i in range(200))
    assert parse_bounce(b"MIME-Version: 1.0\r\n" + deep + b"\r\nx\r\n", OURS).failed == ()
