"""The outbound SMTP transaction as a state machine (issue 13): reply parsing and the rules of
PIPELINING (RFC 2920), CHUNKING (RFC 3030) and lock-step, with plain values and no sockets."""

from __future__ import annotations

import re

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from maildetour.delivery.smtp_pipeline import (
    EAGER_BDAT,
    MAX_LINE,
    MAX_REPLY,
    NEED_REPLY,
    Finished,
    MalformedReply,
    Reply,
    ReplyParser,
    Send,
    Stage,
    Transaction,
    command,
    crlf_lines,
    message_bytes,
)

# Single-line, multi-line (with the enhanced code on every line), LF-only, UTF-8 text, a
# code without text, and a 421: everything a server may send, in one stream.
STREAM = (
    b"250 2.1.0 Sender OK\r\n"
    b"550-5.1.1 The email account that you tried to reach does not exist.\r\n"
    b"550-5.1.1 Please try double-checking the recipient's email address.\r\n"
    b"550 5.1.1 https://support.example/mail/?p=NoSuchUser\r\n"
    b"250 OK\n"
    + "354 Go ahead, grüße\r\n".encode()
    + b"250\r\n"
    b"421 4.4.5 Server busy\r\n"
)
EXPECTED = [
    Reply(250, "2.1.0 Sender OK"),
    Reply(550, "5.1.1 The email account that you tried to reach does not exist.\n"
               "5.1.1 Please try double-checking the recipient's email address.\n"
               "5.1.1 https://support.example/mail/?p=NoSuchUser"),
    Reply(250, "OK"),
    Reply(354, "Go ahead, grüße"),
    Reply(250, ""),
    Reply(421, "4.4.5 Server busy"),
]


def parse_in_pieces(stream: bytes, cuts: list[int]) -> list[Reply]:
    parser = ReplyParser()
    replies: list[Reply] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        replies += parser.feed(stream[start:end])
    assert not parser.pending
    return replies


def test_replies_come_out_whole_and_in_order_however_the_bytes_are_split() -> None:
    assert parse_in_pieces(STREAM, []) == EXPECTED  # several replies in one read
    for cut in range(len(STREAM) + 1):  # two reads, split at every byte boundary
        assert parse_in_pieces(STREAM, [cut]) == EXPECTED, cut
    assert parse_in_pieces(STREAM, list(range(1, len(STREAM)))) == EXPECTED  # one byte a read


@given(st.lists(st.integers(0, len(STREAM)), max_size=8))
def test_any_split_into_many_reads_gives_the_same_replies(cuts: list[int]) -> None:
    assert parse_in_pieces(STREAM, sorted(set(cuts))) == EXPECTED


def test_a_reply_is_complete_only_with_its_last_line() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250-first\r\n250-second\r\n") == []
    assert parser.pending
    assert parser.feed(b"250 last\r") == []
    assert parser.feed(b"\n") == [Reply(250, "first\nsecond\nlast")]
    assert not parser.pending


def test_bytes_that_are_not_replies_or_too_many_of_them_are_malformed() -> None:
    with pytest.raises(MalformedReply):
        ReplyParser().feed(b"hello there\r\n")
    with pytest.raises(MalformedReply):  # no line end in sight: refused before it ends
        ReplyParser().feed(b"250 " + b"x" * MAX_LINE)
    endless = ReplyParser()
    with pytest.raises(MalformedReply):  # endless continuation lines
        for _ in range(MAX_REPLY // 100 + 1):
            endless.feed(b"250-" + b"x" * 96 + b"\r\n")


def test_command_lines_refuse_control_characters() -> None:
    assert command(b"RCPT", b"TO:<a@b.test>") == b"RCPT TO:<a@b.test>\r\n"
    for bad in (b"TO:<a@b.test>\r\nRSET", b"TO:<a\x00@b.test>", b"TO:<a@b.test>\n"):
        with pytest.raises(ValueError):
            command(b"RCPT", bad)


def test_message_is_dot_stuffed_with_crlf_line_endings() -> None:
    assert message_bytes(b"a\r\n.b\r\n..c\r\nd") == b"a\r\n..b\r\n...c\r\nd\r\n.\r\n"
    assert message_bytes(b".\nx\ry\r\n") == b"..\r\nx\r\ny\r\n.\r\n"
    assert message_bytes(b"") == b"\r\n.\r\n"


@given(st.binary(max_size=200) | st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n"])).map(b"".join))
def test_message_bytes_are_what_aiosmtplib_sent(data: bytes) -> None:
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    assert message_bytes(data) == expected


# --- the transaction ------------------------------------------------------------------------
OK = Reply(250, "2.0.0 OK")
GO = Reply(354, "go ahead")
QUEUED = Reply(250, "2.0.0 queued")
NO_USER = Reply(550, "5.1.1 no such user")
NO_SENDER = Reply(550, "5.7.1 sender refused")
NEED_MAIL = Reply(503, "5.5.1 need MAIL command")
NO_RCPT = Reply(554, "5.5.1 no valid recipients")
LATER = Reply(451, "4.3.0 try again later")
CLOSING = Reply(421, "4.4.5 closing")
DATA = b"Subject: x\r\n\r\n.dot\r\n"


def transaction(*recipients: str, pipelining: bool = True) -> Transaction:
    return Transaction("s@x.test", recipients, ["SIZE=20"], data=DATA, utf8=False, pipelining=pipelining)


def run(t: Transaction, replies: list[Reply]) -> tuple[list[bytes], Finished]:
    """Answer `t` with `replies` in order; return what it wrote and how it ended."""
    first = t.start()
    writes, owed = [first.data], first.replies
    for i, reply in enumerate(replies):
        assert owed > 0, f"reply {i} was not asked for"
        owed -= 1
        step = t.receive(reply)
        if isinstance(step, Finished):
            assert i == len(replies) - 1, "finished before every reply was read"
            assert t.waiting is None
            return writes, step
        if isinstance(step, Send):
            writes.append(step.data)
            owed += step.replies
        else:
            assert step is NEED_REPLY
    raise AssertionError(f"not finished; waiting for {t.waiting}")


def test_pipelined_mail_rcpts_and_data_go_in_one_write() -> None:
    t = transaction("a@d.test", "b@d.test")
    first = t.start()
    assert first == Send(b"MAIL FROM:<s@x.test> SIZE=20\r\nRCPT TO:<a@d.test>\r\nRCPT TO:<b@d.test>\r\n"
                         b"DATA\r\n", 4)
    assert [t.waiting, t.receive(OK)] == [Stage.MAIL, NEED_REPLY]
    assert [t.waiting, t.receive(OK)] == [Stage.RCPT, NEED_REPLY]
    assert [t.waiting, t.receive(OK)] == [Stage.RCPT, NEED_REPLY]
    assert t.waiting is Stage.DATA
    assert t.receive(GO) == Send(b"Subject: x\r\n\r\n..dot\r\n.\r\n", 1)
    assert t.waiting is Stage.MESSAGE
    assert t.receive(QUEUED) == Finished({"a@d.test": QUEUED, "b@d.test": QUEUED}, clean=True, closing=False)


def test_one_recipient_refused_keeps_its_own_reply() -> None:
    writes, end = run(transaction("a@d.test", "b@d.test", "c@d.test"), [OK, OK, NO_USER, OK, GO, QUEUED])
    assert end == Finished({"a@d.test": QUEUED, "b@d.test": NO_USER, "c@d.test": QUEUED}, True, False)
    assert len(writes) == 2  # the envelope and DATA, then the message


def test_no_recipient_accepted_and_data_refused() -> None:
    writes, end = run(transaction("a@d.test", "b@d.test"), [OK, NO_USER, NO_USER, NO_RCPT])
    assert end == Finished({"a@d.test": NO_USER, "b@d.test": NO_USER}, clean=False, closing=False)
    assert len(writes) == 1


def test_354_with_no_recipient_accepted_gets_the_dot_alone() -> None:
    writes, end = run(transaction("a@d.test"), [OK, NO_USER, GO, Reply(554, "5.5.1 no recipients")])
    assert writes[1:] == [b".\r\n"]  # RFC 2920 3.1: the message itself never goes
    assert end == Finished({"a@d.test": NO_USER}, clean=False, closing=False)


def test_refused_mail_decides_every_recipient_and_later_replies_are_still_read() -> None:
    writes, end = run(transaction("a@d.test", "b@d.test"), [NO_SENDER, NEED_MAIL, NEED_MAIL, NEED_MAIL])
    assert end == Finished({"a@d.test": NO_SENDER, "b@d.test": NO_SENDER}, clean=False, closing=False)
    assert len(writes) == 1
    # A server that accepts RCPT and DATA after refusing MAIL still never gets the message.
    writes, end = run(transaction("a@d.test"), [NO_SENDER, OK, GO, OK])
    assert writes[1:] == [b".\r\n"]
    assert end.replies == {"a@d.test": NO_SENDER}


def test_refused_data_or_message_decides_the_accepted_recipients() -> None:
    _, end = run(transaction("a@d.test", "b@d.test"), [OK, OK, NO_USER, LATER])
    assert end == Finished({"a@d.test": LATER, "b@d.test": NO_USER}, clean=False, closing=False)
    refused = Reply(550, "5.7.26 unauthenticated")
    _, end = run(transaction("a@d.test", "b@d.test"), [OK, OK, NO_USER, GO, refused])
    assert end == Finished({"a@d.test": refused, "b@d.test": NO_USER}, clean=True, closing=False)


@pytest.mark.parametrize("pipelining", [True, False])
def test_421_decides_every_open_recipient_and_ends_at_once(pipelining: bool) -> None:
    t = transaction("a@d.test", "b@d.test", "c@d.test", pipelining=pipelining)
    _, end = run(t, [OK, OK, NO_USER, CLOSING])
    assert end == Finished({"a@d.test": CLOSING, "b@d.test": NO_USER, "c@d.test": CLOSING},
                           clean=False, closing=True)
    _, end = run(transaction("a@d.test", pipelining=pipelining), [CLOSING])
    assert end == Finished({"a@d.test": CLOSING}, clean=False, closing=True)
    _, end = run(transaction("a@d.test", pipelining=pipelining), [OK, OK, GO, CLOSING])
    assert end == Finished({"a@d.test": CLOSING}, clean=False, closing=True)


def test_lock_step_sends_one_command_per_reply() -> None:
    t = transaction("a@d.test", "b@d.test", pipelining=False)
    assert t.start() == Send(b"MAIL FROM:<s@x.test> SIZE=20\r\n", 1)
    assert t.receive(OK) == Send(b"RCPT TO:<a@d.test>\r\n", 1)
    assert t.receive(NO_USER) == Send(b"RCPT TO:<b@d.test>\r\n", 1)
    assert t.receive(OK) == Send(b"DATA\r\n", 1)
    assert t.receive(GO) == Send(b"Subject: x\r\n\r\n..dot\r\n.\r\n", 1)
    assert t.receive(QUEUED) == Finished({"a@d.test": NO_USER, "b@d.test": QUEUED}, clean=True, closing=False)


def test_lock_step_stops_where_there_is_nothing_more_to_ask() -> None:
    writes, end = run(transaction("a@d.test", "b@d.test", pipelining=False), [NO_SENDER])
    assert len(writes) == 1 and end.replies == {"a@d.test": NO_SENDER, "b@d.test": NO_SENDER}
    writes, end = run(transaction("a@d.test", "b@d.test", pipelining=False), [OK, NO_USER, NO_USER])
    assert [w.split(b" ")[0] for w in writes] == [b"MAIL", b"RCPT", b"RCPT"]  # no DATA
    assert end == Finished({"a@d.test": NO_USER, "b@d.test": NO_USER}, clean=False, closing=False)


# A server's answers to MAIL, two RCPTs, DATA and the message, as a pipelining client reads them
# (None: never asked for). A lock-step client asks for less; both must decide alike.
SCRIPTS = [
    [OK, OK, OK, GO, QUEUED],
    [OK, NO_USER, OK, GO, QUEUED],
    [OK, NO_USER, NO_USER, NO_RCPT, None],
    [NO_SENDER, NEED_MAIL, NEED_MAIL, NEED_MAIL, None],
    [OK, OK, OK, LATER, None],
    [OK, OK, OK, GO, Reply(552, "5.3.4 too big")],
    [OK, OK, CLOSING, None, None],
]


def lock_step_part(script: list[Reply | None]) -> list[Reply]:
    """The replies a lock-step client gets from the same server."""
    mail, rcpt1, rcpt2, data, message = script
    assert mail is not None and rcpt1 is not None and rcpt2 is not None
    if mail.code != 250:
        return [mail]
    if CLOSING in (rcpt1, rcpt2):
        return [mail, rcpt1, rcpt2][:[mail, rcpt1, rcpt2].index(CLOSING) + 1]
    if OK not in (rcpt1, rcpt2):
        return [mail, rcpt1, rcpt2]
    return [r for r in script if r is not None]


@pytest.mark.parametrize("script", SCRIPTS)
def test_pipelining_and_lock_step_decide_alike(script: list[Reply | None]) -> None:
    _, pipelined = run(transaction("a@d.test", "b@d.test"), [r for r in script if r is not None])
    _, lock_step = run(transaction("a@d.test", "b@d.test", pipelining=False), lock_step_part(script))
    assert pipelined.replies == lock_step.replies
    assert pipelined.closing == lock_step.closing


def test_utf8_addresses_and_misuse() -> None:
    t = Transaction("jörg@x.test", ["ü@d.test"], ["SMTPUTF8"], data=b"x", utf8=True, pipelining=True)
    assert t.start().data == "MAIL FROM:<jörg@x.test> SMTPUTF8\r\nRCPT TO:<ü@d.test>\r\nDATA\r\n".encode()
    with pytest.raises(RuntimeError):
        t.start()
    with pytest.raises(ValueError):
        Transaction("s@x.test", [], [], data=b"x", utf8=False, pipelining=True)
    with pytest.raises(RuntimeError):
        transaction("a@d.test").receive(OK)  # nothing was sent, nothing is owed
    assert re.fullmatch(rb"[^\r\n]*\r\n", command(b"DATA"))


# --- CHUNKING (RFC 3030): the message in one BDAT LAST chunk -----------------------------------
REFUSED = Reply(552, "5.7.0 message refused")
BAD_SEQUENCE = Reply(503, "5.5.1 no valid recipients")
CHUNK = b"Subject: x\r\n\r\n.dot\r\n"  # DATA as it is: CRLF already, a leading dot NOT doubled


def chunked(*recipients: str, pipelining: bool = True, data: bytes = DATA, reset: bool = False) -> Transaction:
    return Transaction("s@x.test", recipients, ["SIZE=20"], data=data, utf8=False, pipelining=pipelining,
                       chunking=True, reset=reset)


def test_pipelined_mail_rcpts_and_bdat_with_the_message_go_in_one_write() -> None:
    t = chunked("a@d.test", "b@d.test")
    assert t.start() == Send(b"MAIL FROM:<s@x.test> SIZE=20\r\nRCPT TO:<a@d.test>\r\nRCPT TO:<b@d.test>\r\n"
                             b"BDAT 20 LAST\r\nSubject: x\r\n\r\n.dot\r\n", 4)
    assert [t.waiting, t.receive(OK)] == [Stage.MAIL, NEED_REPLY]
    assert [t.waiting, t.receive(OK)] == [Stage.RCPT, NEED_REPLY]
    assert [t.waiting, t.receive(OK)] == [Stage.RCPT, NEED_REPLY]
    assert t.waiting is Stage.BDAT
    assert t.receive(QUEUED) == Finished({"a@d.test": QUEUED, "b@d.test": QUEUED}, clean=True, closing=False)


def test_bdat_chunk_is_crlf_and_never_dot_stuffed() -> None:
    writes, end = run(chunked("a@d.test", data=b"a\n.b\n..c\rd"), [OK, OK, QUEUED])
    assert writes == [b"MAIL FROM:<s@x.test> SIZE=20\r\nRCPT TO:<a@d.test>\r\n"
                      b"BDAT 15 LAST\r\na\r\n.b\r\n..c\r\nd\r\n"]
    assert end.clean
    assert crlf_lines(b"x") == b"x\r\n" and crlf_lines(b"") == b"\r\n" and crlf_lines(b"y\r\n") == b"y\r\n"


@given(st.binary(max_size=200) | st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n"])).map(b"".join))
def test_the_chunk_is_the_dot_stuffed_message_undone(data: bytes) -> None:
    """The receiver of DATA removes the stuffing and the "."; BDAT's gets those bytes as sent."""
    lines = message_bytes(data)[:-3].split(b"\r\n")
    assert crlf_lines(data) == b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def test_a_message_over_eager_bdat_waits_for_the_rcpt_replies() -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * EAGER_BDAT
    t = chunked("a@d.test", "b@d.test", data=big)
    first = t.start()
    assert first == Send(b"MAIL FROM:<s@x.test> SIZE=20\r\nRCPT TO:<a@d.test>\r\nRCPT TO:<b@d.test>\r\n", 3)
    assert t.receive(OK) is NEED_REPLY and t.receive(NO_USER) is NEED_REPLY
    body = big + b"\r\n"
    assert t.receive(OK) == Send(b"BDAT %d LAST\r\n" % len(body) + body, 1)
    assert t.waiting is Stage.BDAT
    assert t.receive(QUEUED) == Finished({"a@d.test": NO_USER, "b@d.test": QUEUED}, clean=True, closing=False)
    # Nobody accepted, or MAIL refused: the message never goes.
    for replies in ([OK, NO_USER], [NO_SENDER, NEED_MAIL]):
        writes, end = run(chunked("a@d.test", data=big), replies)
        assert len(writes) == 1 and end == Finished({"a@d.test": replies[-1] if replies[0] == OK else NO_SENDER},
                                                     clean=False, closing=False)


def test_lock_step_bdat() -> None:
    t = chunked("a@d.test", "b@d.test", pipelining=False)
    assert t.start() == Send(b"MAIL FROM:<s@x.test> SIZE=20\r\n", 1)
    assert t.receive(OK) == Send(b"RCPT TO:<a@d.test>\r\n", 1)
    assert t.receive(NO_USER) == Send(b"RCPT TO:<b@d.test>\r\n", 1)
    assert t.receive(OK) == Send(b"BDAT 20 LAST\r\n" + CHUNK, 1)
    assert t.waiting is Stage.BDAT
    assert t.receive(QUEUED) == Finished({"a@d.test": NO_USER, "b@d.test": QUEUED}, clean=True, closing=False)
    writes, end = run(chunked("a@d.test", pipelining=False), [OK, NO_USER])  # nobody accepted: no BDAT
    assert [w.split(b" ")[0] for w in writes] == [b"MAIL", b"RCPT"] and not end.clean


def test_refused_mail_decides_every_recipient_and_the_bdat_reply_is_ignored() -> None:
    writes, end = run(chunked("a@d.test", "b@d.test"), [NO_SENDER, NEED_MAIL, NEED_MAIL, BAD_SEQUENCE])
    assert end == Finished({"a@d.test": NO_SENDER, "b@d.test": NO_SENDER}, clean=False, closing=False)
    assert len(writes) == 1
    # Even a 250 to BDAT after a refused MAIL decides nothing.
    _, end = run(chunked("a@d.test"), [NO_SENDER, OK, QUEUED])
    assert end == Finished({"a@d.test": NO_SENDER}, clean=False, closing=False)


def test_every_rcpt_refused_and_the_bdat_reply_is_ignored() -> None:
    writes, end = run(chunked("a@d.test", "b@d.test"), [OK, NO_USER, LATER, BAD_SEQUENCE])
    assert end == Finished({"a@d.test": NO_USER, "b@d.test": LATER}, clean=False, closing=False)
    assert len(writes) == 1


def test_one_of_two_rcpts_refused_the_other_decided_by_the_bdat_reply() -> None:
    _, end = run(chunked("a@d.test", "b@d.test"), [OK, NO_USER, OK, QUEUED])
    assert end == Finished({"a@d.test": NO_USER, "b@d.test": QUEUED}, clean=True, closing=False)


def test_552_to_bdat_last_decides_the_accepted_and_the_session_is_not_clean() -> None:
    _, end = run(chunked("a@d.test", "b@d.test"), [OK, OK, NO_USER, REFUSED])
    assert end == Finished({"a@d.test": REFUSED, "b@d.test": NO_USER}, clean=False, closing=False)
    _, end = run(chunked("a@d.test"), [OK, OK, LATER])
    assert end == Finished({"a@d.test": LATER}, clean=False, closing=False)
    _, end = run(chunked("a@d.test"), [OK, OK, CLOSING])
    assert end == Finished({"a@d.test": CLOSING}, clean=False, closing=True)


def test_reset_goes_ahead_of_mail_and_its_reply_is_owed_and_ignored() -> None:
    t = chunked("a@d.test", reset=True)
    assert t.start() == Send(b"RSET\r\nMAIL FROM:<s@x.test> SIZE=20\r\nRCPT TO:<a@d.test>\r\n"
                             b"BDAT 20 LAST\r\n" + CHUNK, 4)
    assert t.waiting is Stage.RSET
    assert t.receive(Reply(500, "5.5.1 what")) is NEED_REPLY  # a failed RSET: MAIL's reply tells
    assert t.waiting is Stage.MAIL
    assert t.receive(OK) is NEED_REPLY and t.receive(OK) is NEED_REPLY
    assert t.receive(QUEUED) == Finished({"a@d.test": QUEUED}, clean=True, closing=False)
    # With DATA too; and a 421 to RSET decides everything at once.
    plain = Transaction("s@x.test", ["a@d.test"], [], data=DATA, utf8=False, pipelining=True, reset=True)
    assert plain.start() == Send(b"RSET\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<a@d.test>\r\nDATA\r\n", 4)
    _, end = run(chunked("a@d.test", reset=True), [CLOSING])
    assert end == Finished({"a@d.test": CLOSING}, clean=False, closing=True)
    with pytest.raises(ValueError):
        chunked("a@d.test", pipelining=False, reset=True)


def test_lmtp_ignores_chunking() -> None:
    t = Transaction("s@x.test", ["a@d.test"], [], data=DATA, utf8=False, pipelining=True, lmtp=True, chunking=True)
    assert t.start().data.endswith(b"DATA\r\n")


@pytest.mark.parametrize("script", SCRIPTS)
def test_chunking_and_data_decide_alike(script: list[Reply | None]) -> None:
    """The same server answers BDAT LAST as it would the end of DATA (a refused DATA: as BDAT)."""
    mail, rcpt1, rcpt2, data, message = script
    assert mail is not None and rcpt1 is not None and rcpt2 is not None
    last = [r for r in (message if data == GO else data,) if r is not None]
    _, with_data = run(transaction("a@d.test", "b@d.test"), [r for r in script if r is not None])
    _, with_bdat = run(chunked("a@d.test", "b@d.test"), [mail, rcpt1, rcpt2, *last])
    assert with_bdat.replies == with_data.replies and with_bdat.closing == with_data.closing
