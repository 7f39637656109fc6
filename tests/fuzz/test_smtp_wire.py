"""The real `maildetour serve` fed made-up SMTP sessions over a socket: every line it sends back
is a proper reply (three digits, 2xx-5xx, no exception text), and afterwards it still serves a
normal message. (Smuggling and bare CR/LF have their own tests in test_inbound_smtp.py.)
(Issue 10: "Bad inputs tried": SMTP commands and addresses.)
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.harness import Server, message, running_server

REPLY = re.compile(rb"^[2-5]\d\d[ -]")
VERBS = ["EHLO client.test", "HELO client.test", "MAIL FROM:", "RCPT TO:", "DATA", "RSET", "NOOP", "VRFY",
         "EXPN", "HELP", "QUIT", "STARTTLS", "AUTH PLAIN", "BDAT 10", "XCLIENT ADDR=1.2.3.4", "mail from:"]
ARGS = st.one_of(
    st.just(""),
    st.sampled_from(["<ituki@example.com>", "<>", "<@relay.example:ituki@example.com>", '<"ituki"@example.com>',
                     "<(c)@relay.example:ituki@example.com>", "<ituki@example.com> SIZE=99999999999",
                     "<ituki@example.com> BODY=8BITMIME SMTPUTF8", "<SRS0=aaaaaaaa=TT=x.org=a@example.com>",
                     "<nobody@elsewhere.org>", "<" + "a" * 300 + "@example.com>"]),
    st.text(max_size=80).filter(lambda s: "\n" not in s and "\r" not in s),
)
LINE = st.one_of(
    st.builds(lambda verb, arg: (verb + arg).encode("utf-8", "surrogatepass") + b"\r\n", st.sampled_from(VERBS), ARGS),
    st.binary(max_size=200).map(lambda b: b + b"\r\n"),
    st.sampled_from([b"EHLO x\nMAIL FROM:<a@b.c>\r\n", b"NOOP\rNOOP\r\n", b"A" * 600 + b"\r\n", b"\x00\xff\r\n",
                     b".\r\n", b"MAIL FROM:<a@b.c>\r\nRCPT TO:<ituki@example.com>\r\nDATA\r\n"]),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("wire")) as srv:
        yield srv


def replies(sock: socket.socket) -> list[bytes]:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, socket.timeout, ConnectionResetError):
        pass
    return [line for line in data.split(b"\r\n") if line]


@given(st.lists(LINE, max_size=12))
@example([b"EHLO x\r\n", b"MAIL FROM:<a@sender.example>\r\n", b"RCPT TO:<ituki@example.com>\r\n", b"DATA\r\n",
          b"Subject: x\r\n\r\nbody\n.\r\n"])
@example([b"EHLO x\r\n", b"MAIL FROM:<a@sender.example>\r\n", b"RCPT TO:<ituki@example.com>\r\n", b"DATA\r\n",
          b"Subject: x\r\n\r\nbody\r\n.\nMAIL FROM:<evil@x.org>\r\n.\r\n"])
def test_any_session_gets_proper_replies_and_the_server_keeps_serving(server: Server, lines: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", server.smtp_port), timeout=5) as sock:
        sock.settimeout(0.3)
        for line in lines:
            try:
                sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed the session: fine, it said why first
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        got = replies(sock)
    for reply in got:
        assert REPLY.match(reply), reply[:120]
        assert b"Traceback" not in reply and b"Error: (" not in reply  # no exception text, ever


def test_after_the_fuzz_a_normal_message_still_goes_through(server: Server) -> None:
    queue_id = server.send(message("after the fuzz"))
    server.wait_event(queue_id, "accepted")
    assert "Traceback" not in server.log()
