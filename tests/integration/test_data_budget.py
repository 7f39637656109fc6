"""Memory bounded by bytes while receiving (issue 10): over `max_bytes_receiving`, a DATA waits
for room instead of taking more memory; a client that sends more than its SIZE gets 552."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.harness import message, running_server

PC = "ituki@pc.example.net"


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buf = b""
        assert self.reply().startswith("220")
        assert self.cmd(b"EHLO client.test").startswith("250")

    def reply(self) -> str:
        """The last line of the next (perhaps multi-line) reply."""
        while True:
            while b"\r\n" in self.buf:
                line, self.buf = self.buf.split(b"\r\n", 1)
                if len(line) < 4 or line[3:4] != b"-":
                    return line.decode()
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed"
            self.buf += chunk

    def cmd(self, line: bytes) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def begin(self, size: int) -> None:
        assert self.cmd(f"MAIL FROM:<alice@sender.example> SIZE={size}".encode()).startswith("250")
        assert self.cmd(f"RCPT TO:<{PC}>".encode()).startswith("250")


def test_a_data_beyond_the_budget_waits_until_another_message_is_in(tmp_path: Path) -> None:
    with running_server(tmp_path, extra="", delivery_extra="") as server:
        config = server.config.read_text().replace("[smtp]\n", '[smtp]\nmax_bytes_receiving = "100KB"\n', 1)
        server.stop()
        server.config.write_text(config)
        server.start()
        first, second = Client(server.smtp_port), Client(server.smtp_port)
        first.begin(80_000)
        second.begin(80_000)
        assert first.cmd(b"DATA").startswith("354")
        second.sock.sendall(b"DATA\r\n")
        second.sock.settimeout(1.0)
        try:
            early = second.sock.recv(100)
        except TimeoutError:
            early = b""
        assert early == b""  # no 354 while the first message holds the budget
        second.sock.settimeout(15)
        first.sock.sendall(message("first", to=PC) + b".\r\n")
        assert first.reply().startswith("250")
        assert second.reply().startswith("354")  # room again
        second.sock.sendall(message("second", to=PC) + b".\r\n")
        assert second.reply().startswith("250")
        assert len(server.wait_mailbox(PC, 2)) == 2


def test_more_than_the_declared_size_is_refused_with_552(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        client = Client(server.smtp_port)
        client.begin(1_000)
        assert client.cmd(b"DATA").startswith("354")
        body = b"x" * 998 + b"\r\n"
        client.sock.sendall(message("too big for its SIZE", to=PC) + body * 100 + b".\r\n")
        assert client.reply().startswith("552")
        client.begin(200_000)  # the session goes on; an honest SIZE gets through
        assert client.cmd(b"DATA").startswith("354")
        client.sock.sendall(message("honest", to=PC) + body * 100 + b".\r\n")
        assert client.reply().startswith("250")
