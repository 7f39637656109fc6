"""Per-client limits of the SMTP listener (issue 10 #8, #4 and "rate control in"), in process
with the limits set small: real sockets and clients over loopback, one client on 127.0.0.1 and
"another" on 127.0.0.2 (both loopback, listed as limited unless a test says otherwise)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from maildetour.config.model import SmtpConfig
from maildetour.inbound.handler import Handler, InboundLimits
from maildetour.inbound import server as server_module
from maildetour.inbound.server import SessionFactory, start_smtp
from tests.configs import seed_config
from tests.fakes import MemoryStore
from tests.harness import message
from tests.integration.test_inbound_smtp import Raw

ONE, OTHER = "127.0.0.1", "127.0.0.2"


class Listener:
    """The inbound listener with `limits`, on its own loop in a thread, with a MemoryStore."""

    def __init__(self, tmp_path: Path, limits: SmtpConfig) -> None:
        self.store = MemoryStore()
        self.accepted: list[str] = []
        config = seed_config(tmp_path)
        handler = Handler(table=config.routing_table(), store=self.store, hostname="mx.example.com",
                          limits=InboundLimits(100, 50), clock=time.time,
                          on_accepted=lambda copies: self.accepted.append(copies[0].queue_id))
        self.factory = SessionFactory(handler, hostname="mx.example.com", max_sessions=limits.max_sessions,
                                      max_message_size=1 << 20, command_timeout=30, data_timeout=60, tls=None,
                                      max_line_length=8192, limits=limits)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(start_smtp(self.factory, "127.0.0.1", 0), self.loop).result()
        self.port = self.server.sockets[0].getsockname()[1]

    def connect(self, source: str = ONE) -> Raw:
        raw = Raw.__new__(Raw)
        raw.sock = socket.create_connection(("127.0.0.1", self.port), timeout=15, source_address=(source, 0))
        raw.buf = b""
        return raw

    def session(self, source: str = ONE) -> Raw:
        raw = self.connect(source)
        assert raw.reply().startswith("220 mx.example.com"), "no greeting"
        assert raw.cmd(b"EHLO client.test").startswith("250")
        return raw

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    made: list[Listener] = []

    def make(**limits: Any) -> Listener:
        base = SmtpConfig(unlimited_clients=())
        made.append(Listener(tmp_path, dataclasses.replace(base, **limits)))
        return made[-1]

    yield make
    for item in made:
        item.close()


def _wait_closed(raw: Raw) -> None:
    assert raw.reply() == "<closed>"


def test_one_client_cannot_hold_every_session_slot(listener: Callable[..., Listener]) -> None:
    """issue 10 #8: 4 idle sessions of max_sessions = 4 locked out the fifth client. One client
    now gets at most half the slots (421 4.7.0 beyond); another client still gets in."""
    srv = listener(max_sessions=4, max_sessions_per_client=2)
    held = [srv.connect(ONE) for _ in range(2)]
    assert all(raw.reply().startswith("220") for raw in held)
    for _ in range(2):
        extra = srv.connect(ONE)
        assert extra.reply().startswith("421 4.7.0 Too many connections from your address")
        extra.close()
    other = srv.session(OTHER)
    assert other.cmd(b"NOOP").startswith("250")
    held[0].close()
    time.sleep(0.2)
    again = srv.connect(ONE)
    assert again.reply().startswith("220")  # its slot came back
    for raw in (*held, other, again):
        raw.close()


def test_noop_and_friends_do_not_keep_a_session_alive(listener: Callable[..., Listener]) -> None:
    """issue 10 #8: commands that move nothing on (NOOP, RSET, HELP, VRFY, EHLO again) are
    counted; past the limit: 421 4.7.0 and closed. An accepted MAIL or RCPT resets the count."""
    srv = listener(max_commands_without_progress=6)
    raw = srv.session()  # EHLO: 1
    for line in (b"NOOP", b"RSET", b"VRFY ituki@example.com", b"EHLO again.test"):  # 2..5
        assert raw.cmd(line)[0] in "25"
    assert raw.cmd(b"MAIL FROM:<a@sender.example>").startswith("250")  # progress
    assert raw.cmd(b"RCPT TO:<ituki@example.com>").startswith("250")  # progress
    for _ in range(6):
        assert raw.cmd(b"NOOP").startswith("250")
    assert raw.cmd(b"NOOP").startswith("421 4.7.0 Too many commands without progress")
    _wait_closed(raw)
    assert srv.session(ONE).cmd(b"NOOP").startswith("250")  # the server serves on


def test_a_session_has_a_lifetime(listener: Callable[..., Listener]) -> None:
    """issue 10 #8: a session older than max_session_time gets 421 at its next command."""
    srv = listener(max_session_time=1.0)
    raw = srv.session()
    assert raw.cmd(b"NOOP").startswith("250")
    time.sleep(1.2)
    assert raw.cmd(b"NOOP").startswith("421 4.7.0 Session time limit")
    _wait_closed(raw)


def test_refused_recipients_are_limited_per_session(listener: Callable[..., Listener]) -> None:
    """issue 10 #4 and #8: invalid recipients were unlimited (300 in 0.5 s in one session).
    After max_refused_recipients, the next command gets 421 4.7.0 and the session ends, even
    when valid recipients are mixed in."""
    srv = listener(max_refused_recipients=3)
    raw = srv.session()
    raw.cmd(b"MAIL FROM:<a@sender.example>")
    for n in range(3):
        if n:
            assert raw.cmd(b"RCPT TO:<ituki@example.com>").startswith("250")
        assert raw.cmd(f"RCPT TO:<nobody{n}@example.com>".encode()).startswith("550 5.1.1")
    assert raw.cmd(b"RCPT TO:<ituki@example.com>").startswith("421 4.7.0 Too many refused recipients")
    _wait_closed(raw)


def test_refused_recipients_are_limited_per_client_over_a_window(listener: Callable[..., Listener]) -> None:
    """issue 10 #4: over max_refused_per_client within refused_window, every RCPT from that
    client gets 450 4.7.1, valid or not, so the answers tell nothing; others are unaffected."""
    srv = listener(max_refused_recipients=3, max_refused_per_client=4, refused_window=3600.0)
    first = srv.session()
    first.cmd(b"MAIL FROM:<a@sender.example>")
    for n in range(3):
        assert first.cmd(f"RCPT TO:<nobody{n}@example.com>".encode()).startswith("550")
    first.close()
    second = srv.session()
    second.cmd(b"MAIL FROM:<a@sender.example>")
    assert second.cmd(b"RCPT TO:<nobody9@example.com>").startswith("550")  # the 4th
    for rcpt in (b"<ituki@example.com>", b"<nobody10@example.com>", b"<ituki-ex@gmail.com>"):
        assert second.cmd(b"RCPT TO:" + rcpt).startswith("450 4.7.1 Too many refused recipients")
    other = srv.session(OTHER)
    other.cmd(b"MAIL FROM:<a@sender.example>")
    assert other.cmd(b"RCPT TO:<ituki@example.com>").startswith("250")
    for raw in (second, other):
        raw.close()


def test_connections_per_minute_per_client(listener: Callable[..., Listener]) -> None:
    """issue 10, rate control in: over client_connections_per_minute, 421 4.7.0 and closed."""
    srv = listener(client_connections_per_minute=3)
    for _ in range(3):
        raw = srv.connect(ONE)
        assert raw.reply().startswith("220")
        raw.close()
    raw = srv.connect(ONE)
    assert raw.reply().startswith("421 4.7.0 Too many connections from your address per minute")
    _wait_closed(raw)
    other = srv.connect(OTHER)
    assert other.reply().startswith("220")
    other.close()


def test_messages_and_recipients_per_minute_per_client(listener: Callable[..., Listener]) -> None:
    """issue 10, rate control in: MAIL over client_messages_per_minute and RCPT over
    client_recipients_per_minute get 450 4.7.1; the session goes on; others are unaffected."""
    srv = listener(client_messages_per_minute=2, client_recipients_per_minute=3)
    raw = srv.session()
    assert raw.cmd(b"MAIL FROM:<a@sender.example>").startswith("250")
    for _ in range(3):
        assert raw.cmd(b"RCPT TO:<ituki@example.com>").startswith("250")
    assert raw.cmd(b"RCPT TO:<ituki@example.com>").startswith("450 4.7.1 Too many recipients from your")
    assert raw.cmd(b"RSET").startswith("250")
    assert raw.cmd(b"MAIL FROM:<a@sender.example>").startswith("250")
    assert raw.cmd(b"RSET").startswith("250")
    assert raw.cmd(b"MAIL FROM:<a@sender.example>").startswith("450 4.7.1 Too much mail from your address")
    assert raw.cmd(b"NOOP").startswith("250")
    other = srv.session(OTHER)
    assert other.cmd(b"MAIL FROM:<a@sender.example>").startswith("250")
    for item in (raw, other):
        item.close()


def test_messages_and_recipients_per_minute_per_sender_domain(listener: Callable[..., Listener]) -> None:
    """issue 10, rate control in: one sender domain over its rates gets 450 4.7.1 from any
    client; other sender domains (and the null sender's own bucket) go on."""
    srv = listener(sender_domain_messages_per_minute=2, sender_domain_recipients_per_minute=2)
    one, other = srv.session(ONE), srv.session(OTHER)
    assert one.cmd(b"MAIL FROM:<a@flood.example>").startswith("250")
    assert one.cmd(b"RCPT TO:<ituki@example.com>").startswith("250")
    assert other.cmd(b"MAIL FROM:<b@FLOOD.example>").startswith("250")
    assert other.cmd(b"RCPT TO:<ituki@example.com>").startswith("250")
    assert other.cmd(b"RCPT TO:<ituki@example.com>").startswith("450 4.7.1 Too many recipients from this sender")
    other.cmd(b"RSET")
    assert other.cmd(b"MAIL FROM:<c@flood.example>").startswith("450 4.7.1 Too much mail from this sender domain")
    assert other.cmd(b"MAIL FROM:<c@calm.example>").startswith("250")
    one.cmd(b"RSET")
    assert one.cmd(b"MAIL FROM:<>").startswith("250")
    for item in (one, other):
        item.close()


def test_unlimited_clients_skip_the_cross_session_limits_only(listener: Callable[..., Listener]) -> None:
    """issue 10, rate control in: a client in unlimited_clients (loopback by default, like
    Postfix's $mynetworks) is not rate limited and may open more sessions; the limits within
    one session still apply to it."""
    srv = listener(unlimited_clients=(f"{OTHER}/32",), max_sessions=4, max_sessions_per_client=1,
                   client_connections_per_minute=1, client_messages_per_minute=1,
                   max_commands_without_progress=3)
    sessions = [srv.session(OTHER) for _ in range(3)]
    assert sessions[0].cmd(b"MAIL FROM:<a@sender.example>").startswith("250")
    sessions[0].cmd(b"RSET")
    assert sessions[0].cmd(b"MAIL FROM:<a@sender.example>").startswith("250")
    for _ in range(2):  # EHLO and two NOOPs: 3 commands without progress
        assert sessions[1].cmd(b"NOOP").startswith("250")
    assert sessions[1].cmd(b"NOOP").startswith("421 4.7.0")
    for raw in sessions:
        raw.close()


def test_default_limits_let_the_benchmark_load_through(listener: Callable[..., Listener]) -> None:
    """issue 10, rate control in: with the defaults (loopback unlimited) 20 sessions from
    127.0.0.1 send 400 messages as fast as they can, pipelined, and every one gets 250."""
    srv = listener(unlimited_clients=SmtpConfig().unlimited_clients)
    body = message("bench").replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n"

    def run() -> int:
        raw = srv.session(ONE)
        ok = 0
        for _ in range(20):
            raw.sock.sendall(b"MAIL FROM:<alice@sender.example>\r\nRCPT TO:<ituki@example.com>\r\nDATA\r\n")
            answers = [raw.reply() for _ in range(3)]
            raw.sock.sendall(body)
            ok += all(a[0] in "23" for a in answers) and raw.reply().startswith("250 2.0.0")
        raw.close()
        return ok

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(run())) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(results) == 400 and len(srv.accepted) == 400


def test_a_trickling_data_phase_is_cut_after_its_grace(listener: Callable[..., Listener],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Like Postfix's smtpd_min_data_rate: after the grace, DATA must average min_data_rate
    bytes a second, or 421 4.4.2 and the connection closes; nothing is accepted. A client that
    keeps up is not cut, however long its DATA takes."""
    monkeypatch.setattr(server_module, "_DATA_RATE_GRACE", 0.5)
    srv = listener(min_data_rate=1000)
    slow, steady = srv.session(ONE), srv.session(OTHER)
    for raw in (slow, steady):
        assert raw.cmd(b"MAIL FROM:<a@sender.example>").startswith("250")
        assert raw.cmd(b"RCPT TO:<ituki@example.com>").startswith("250")
        assert raw.cmd(b"DATA").startswith("354")
    header = b"Subject: trickle\r\nFrom: a@sender.example\r\n\r\n"
    slow.sock.sendall(header)
    steady.sock.sendall(header)
    started = time.monotonic()
    cut = False
    while time.monotonic() - started < 1.5:  # slow: 10 bytes a tick; steady: 1000 (well above the floor)
        if not cut:
            try:
                slow.sock.sendall(b"x" * 8 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                cut = True  # the server closed it; its reply is waiting in our buffer
        steady.sock.sendall(b"y" * 998 + b"\r\n")
        time.sleep(0.1)
    assert slow.reply().startswith("421 4.4.2 "), "a trickle was not cut"
    assert slow.reply() == "<closed>"
    assert steady.cmd(b".").startswith("250"), "a client above the floor was cut"
    assert len(srv.accepted) == 1
    steady.close()


def test_min_data_rate_zero_switches_the_floor_off(listener: Callable[..., Listener],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "_DATA_RATE_GRACE", 0.2)
    srv = listener(min_data_rate=0)
    raw = srv.session()
    assert raw.cmd(b"MAIL FROM:<a@sender.example>").startswith("250")
    assert raw.cmd(b"RCPT TO:<ituki@example.com>").startswith("250")
    assert raw.cmd(b"DATA").startswith("354")
    raw.sock.sendall(b"Subject: slow\r\n\r\n")
    for _ in range(6):
        raw.sock.sendall(b"z\r\n")
        time.sleep(0.1)
    assert raw.cmd(b".").startswith("250")
    raw.close()
