"""Receiving: what the SMTP listener says to clients, over real sockets (the real server)."""

import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness import Server, message, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("inbound")) as srv:
        yield srv


class Raw:
    """A line-level SMTP client, for what smtplib will not send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buf = b""

    def reply(self) -> str:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return "\n".join(lines) + "<closed>"
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode(errors="replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def cmd(self, line: bytes) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def session(server: Server) -> Raw:
    raw = Raw(server.smtp_port)
    assert raw.reply().startswith("220 mx.example.com ESMTP")
    assert raw.cmd(b"EHLO client.test").startswith("250")
    return raw


def test_greeting_names_no_software_version_and_ehlo_lists_the_extensions(server: Server) -> None:
    raw = Raw(server.smtp_port)
    banner = raw.reply()
    assert banner == "220 mx.example.com ESMTP"
    ehlo = raw.cmd(b"EHLO client.test")
    for ext in ("PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 26214400", "ENHANCEDSTATUSCODES"):
        assert ext in ehlo
    assert "DSN" not in ehlo.split() and "AUTH" not in ehlo and "STARTTLS" not in ehlo
    assert raw.cmd(b"VRFY ituki@example.com").startswith("252 2.5.0")
    assert raw.cmd(b"EXPN staff").startswith("502 5.5.1")
    raw.close()


@pytest.mark.parametrize(
    ("rcpt", "expected"),
    [
        (b"<nobody@example.com>", "550 5.1.1"),
        (b"<ituki-ex@gmail.com>", "554 5.7.1"),
        (b"<someone@example.org>", "554 5.7.1"),
        (b"<ituki%gmail.com@example.com>", "553 5.1.3"),
        (b"<gmail.com!ituki@example.com>", "553 5.1.3"),
        (b"<@example.com:ituki-ex@gmail.com>", "553 5.1.3"),
        (b'<"ituki-ex@gmail.com"@example.com>', "553 5.1.3"),
        (b"<ituki@[127.0.0.1]>", "553 5.1.3"),
        (b"<ituki@example.com.>", "553 5.1.3"),
    ],
)
def test_not_an_open_relay(server: Server, rcpt: bytes, expected: str) -> None:
    raw = session(server)
    assert raw.cmd(b"MAIL FROM:<a@sender.example>").startswith("250")
    answer = raw.cmd(b"RCPT TO:" + rcpt)
    assert answer.startswith(expected), answer
    assert "gmail" not in answer.lower()
    raw.close()


def test_case_of_the_recipient_does_not_matter(server: Server) -> None:
    raw = session(server)
    raw.cmd(b"MAIL FROM:<a@sender.example>")
    assert raw.cmd(b"RCPT TO:<ITUKI@EXAMPLE.COM>").startswith("250 2.1.5")
    raw.close()


@pytest.mark.parametrize("body", [b"line one\nline two\r\n", b"line one\rline two\r\n",
                                  b"Subject: x\r\n\r\nsmuggle\n.\r\nMAIL FROM:<x@y.z>\r\n"])
def test_bare_cr_or_lf_in_data_is_refused_and_nothing_is_stored(server: Server, body: bytes) -> None:
    raw = session(server)
    raw.cmd(b"MAIL FROM:<a@sender.example>")
    raw.cmd(b"RCPT TO:<ituki@example.com>")
    assert raw.cmd(b"DATA").startswith("354")
    raw.sock.sendall(b"Subject: bare\r\n\r\n" + body + b".\r\n")
    assert raw.reply().startswith("550 5.5.2")
    # The session goes on, and no second ("smuggled") message was started by the data.
    assert raw.cmd(b"RSET").startswith("250")
    assert raw.cmd(b"QUIT").startswith("221")
    raw.close()
    assert server.mailbox("ituki@pc.example.net") == [] or all(
        b"smuggle" not in m and b"bare" not in m for m in server.mailbox("ituki@pc.example.net"))


def test_too_big_is_552_5_3_4(tmp_path: Path) -> None:
    with running_server(tmp_path, _SMALL) as srv:
        raw = session(srv)
        assert raw.cmd(b"MAIL FROM:<a@sender.example> SIZE=5000000").startswith("552 5.3.4")
        raw.cmd(b"RSET")
        raw.cmd(b"MAIL FROM:<a@sender.example>")
        raw.cmd(b"RCPT TO:<box@example.com>")
        raw.cmd(b"DATA")
        raw.sock.sendall(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 20 + b".\r\n")
        assert raw.reply().startswith("552 5.3.4")
        assert raw.cmd(b"NOOP").startswith("250")  # still serving
        raw.close()


def test_a_loop_is_accepted_quarantined_and_not_forwarded(server: Server) -> None:
    hops = "".join(f"Received: from hop{i}.example by hop{i + 1}.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                   for i in range(50))
    queue_id = server.send(hops.encode() + message("looping"))
    events = server.wait_event(queue_id, "quarantined")
    assert {e[1] for e in events if e[0] == "quarantined"} == {"ituki@pc.example.net", "ituki-ex@gmail.com"}
    assert all(b"looping" not in m for m in server.mailbox("ituki@pc.example.net"))
    assert not any(e[0] in ("delivered", "bounced", "dsn-sent") for e in events)
    listing = server.cli("queue")
    assert listing.returncode == 0 and f"{queue_id}" in listing.stdout and "quarantined" in listing.stdout


def test_too_many_sessions_get_421(tmp_path: Path) -> None:
    with running_server(tmp_path, _SMALL) as srv:
        first, second = Raw(srv.smtp_port), Raw(srv.smtp_port)
        assert first.reply().startswith("220") and second.reply().startswith("220")
        third = Raw(srv.smtp_port)
        assert third.reply().startswith("421 4.7.0")
        first.close()
        time.sleep(0.2)
        fourth = Raw(srv.smtp_port)
        assert fourth.reply().startswith("220")  # a slot came free
        for raw in (second, third, fourth):
            raw.close()


def test_slow_but_moving_data_is_not_cut_off_by_the_idle_timeout(tmp_path: Path) -> None:
    with running_server(tmp_path, _SMALL) as srv:
        raw = session(srv)
        raw.cmd(b"MAIL FROM:<a@sender.example>")
        raw.cmd(b"RCPT TO:<box@example.com>")
        assert raw.cmd(b"DATA").startswith("354")
        raw.sock.sendall(b"Subject: slow\r\n\r\n")
        for _ in range(6):  # 3 s of DATA with a 1 s idle timeout
            time.sleep(0.5)
            raw.sock.sendall(b"still coming\r\n")
        raw.sock.sendall(b".\r\n")
        assert raw.reply().startswith("250 2.0.0 OK: queued as")
        raw.close()


def test_an_idle_client_is_disconnected(tmp_path: Path) -> None:
    with running_server(tmp_path, _SMALL) as srv:
        raw = session(srv)
        time.sleep(2.0)
        assert raw.reply().endswith("<closed>")


_SMALL = """\
[server]
hostname = "mx.example.com"
[smtp]
listen = ["127.0.0.1:{smtp_port}"]
domains = ["example.com"]
max_message_size = "10KB"
max_sessions = 2
command_timeout = "1s"
[delivery]
dns_servers = ["127.0.0.1:9"]
[mailbox."box@example.com"]
password = "x"
"""


def test_long_lines_up_to_the_limit_are_taken_longer_ones_refused(server: Server) -> None:
    raw = session(server)
    for length, expected in ((5000, "250 2.0.0"), (9000, "500 5.5.2")):
        raw.cmd(b"MAIL FROM:<a@sender.example>")
        raw.cmd(b"RCPT TO:<ituki@example.com>")
        assert raw.cmd(b"DATA").startswith("354")
        raw.sock.sendall(b"Subject: long\r\n\r\n" + b"x" * length + b"\r\n.\r\n")
        assert raw.reply().startswith(expected)
    assert raw.cmd(b"NOOP").startswith("250")
    raw.close()
