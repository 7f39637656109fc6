"""Run the real `maildetour serve` as a subprocess on loopback ports, and talk to it.

Used by integration tests: the server is the installed console script's code, started the way
an operator starts it, and can be stopped with SIGTERM or killed with SIGKILL (crash tests).
"""

from __future__ import annotations

import os
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from maildetour.mailbox.maildir import list_messages, message_path
from tests.configs import seed
from tests.peers.ports import free_port

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def seed_text(*, smtp_port: int, pop3_port: int | None, gmail: str, extra: str = "",
              dns: str = "127.0.0.1:9", detour_after: str = "10m", delivery_extra: str = "",
              sender_sink: str | None = None, detour: str | None = None) -> str:
    """The seed config on the given ports. `dns` defaults to a dead loopback port so nothing
    ever asks a real resolver; `sender_sink` receives mail for sender.example (bounces)."""
    relays = f'"gmail.com" = "{gmail}"' + (f', "sender.example" = "{sender_sink}"' if sender_sink else "")
    return seed(smtp=f"127.0.0.1:{smtp_port}", pop3=f"127.0.0.1:{pop3_port}" if pop3_port else None,
                relay=relays, delivery_extra=f'dns_servers = ["{dns}"]\n{delivery_extra}',
                detour_after=detour_after, detour=detour, extra=extra)


def message(subject: str, *, sender: str = "alice@sender.example", to: str = "ituki@example.com",
            body: bytes = b"Hello.\r\n", extra_headers: str = "") -> bytes:
    head = (f"From: Alice <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@sender.example>\r\n{extra_headers}"
            "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    return head.encode() + body


def late_dsn(*, to: str, reporter: str, final_recipient: str, returned: bytes, marker: str) -> bytes:
    """An RFC 3464 report as a remote MTA sends it later: returned headers attached."""
    headers = returned.split(b"\r\n\r\n", 1)[0].decode()
    return (
        f"From: Mail Delivery Subsystem <mailer-daemon@{reporter}>\r\n"
        f"To: {to}\r\n"
        f"Subject: Delivery Status Notification (Failure) {marker}\r\n"
        f"Message-ID: <{marker}@{reporter}>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b0und"\r\n'
        "\r\n"
        "--b0und\r\nContent-Type: text/plain\r\n\r\n"
        f"Your message was not delivered: {marker}.\r\n"
        "--b0und\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.{reporter}\r\n\r\n"
        f"Final-Recipient: rfc822; {final_recipient}\r\n"
        "Action: failed\r\n"
        "Status: 5.7.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.7.1 {marker} refused after acceptance\r\n"
        "\r\n--b0und\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"{headers}\r\n"
        "--b0und--\r\n"
    ).encode()


@dataclass
class Server:
    directory: Path
    config: Path
    smtp_port: int
    pop3_port: int | None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.directory / "server.log"

    def start(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "maildetour.cli", "serve", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
        )
        log.close()
        # Wait for the ready line rather than probing the port: a probe would be a session.
        deadline = time.monotonic() + 15
        while "maildetour ready" not in self.log()[offset:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("maildetour did not start:\n" + self.log())
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def state(self) -> Path:
        return self.directory / "var"

    def smtp(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="client.test", timeout=30)
        client.ehlo()
        return client

    def send(self, data: bytes, *, sender: str = "alice@sender.example",
             to: tuple[str, ...] = ("ituki@example.com",)) -> str:
        """Send one message; return the queue id from the 250 reply."""
        with self.smtp() as client:
            client.mail(sender)
            for rcpt in to:
                code, text = client.rcpt(rcpt)
                assert code == 250, (code, text)
            code, text = client.data(data)
            assert code == 250, (code, text)
        return text.decode().rsplit(" ", 1)[-1]

    def mailbox(self, address: str) -> list[bytes]:
        root = self.state / "mailboxes" / address
        if not root.exists():
            return []
        return [message_path(root, m).read_bytes() for m in list_messages(root)]

    def wait_mailbox(self, address: str, count: int, timeout: float = 15.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.mailbox(address)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{address}: {len(self.mailbox(address))} of {count} messages\n{self.log()}")

    def events(self, queue_id: str) -> list[tuple[str, str, str]]:
        conn = sqlite3.connect(f"file:{self.state / 'queue.sqlite3'}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT kind, target, detail FROM events WHERE queue_id=? ORDER BY id",
                                (queue_id,)).fetchall()
        finally:
            conn.close()

    def wait_event(self, queue_id: str, kind: str, timeout: float = 15.0,
                   target: str | None = None) -> list[tuple[str, str, str]]:
        """Wait for an event of `kind` (for `target`, if given); return all events so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events(queue_id)
            if any(e[0] == kind and target in (None, e[1]) for e in events):
                return events
            time.sleep(0.05)
        raise AssertionError(f"no {kind!r} event for {queue_id}: {self.events(queue_id)}\n{self.log()}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `maildetour ARGS --config <this server's config>`."""
        return subprocess.run([sys.executable, "-m", "maildetour.cli", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=30)


@contextmanager
def running_server(directory: Path, config_text: str | None = None, *, gmail: str = "127.0.0.2:9",
                   pop3: bool = False, **seed: str | None) -> Iterator[Server]:
    """Start maildetour with `config_text` (which may use {smtp_port} and {pop3_port}) or with
    the seed config relaying gmail.com to `gmail`."""
    directory.mkdir(parents=True, exist_ok=True)
    smtp_port = free_port()
    pop3_port = free_port() if pop3 else None
    if config_text is None:
        text = seed_text(smtp_port=smtp_port, pop3_port=pop3_port, gmail=gmail, **seed)  # type: ignore[arg-type]
    else:
        text = config_text.format(smtp_port=smtp_port, pop3_port=pop3_port)
    config = directory / "maildetour.toml"
    config.write_text(text, encoding="utf-8")
    server = Server(directory, config, smtp_port, pop3_port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
