"""The aiosmtpd adapter in process: internal errors, STARTTLS, reply translation."""

import asyncio
import smtplib
import ssl
import threading
from pathlib import Path
from typing import Iterator

import pytest
import trustme

from maildetour.core.redact import Redactor
from maildetour.inbound.handler import Handler, InboundLimits
from maildetour.inbound.server import SessionFactory, start_smtp, translate
from tests.configs import seed_config
from tests.fakes import MemoryStore
from tests.harness import message


class InProcess:
    """The inbound listener on its own loop in a thread, with a MemoryStore."""

    def __init__(self, tmp_path: Path, tls: ssl.SSLContext | None) -> None:
        self.store = MemoryStore()
        self.accepted: list[str] = []
        config = seed_config(tmp_path)
        handler = Handler(table=config.routing_table(), store=self.store, hostname="mx.example.com",
                          limits=InboundLimits(100, 50), clock=lambda: 1.0e9,
                          on_accepted=lambda copies: self.accepted.append(copies[0].queue_id))
        self.factory = SessionFactory(handler, hostname="mx.example.com", max_sessions=10,
                                      max_message_size=1 << 20, command_timeout=30, data_timeout=60, tls=tls,
                                      max_line_length=config.smtp.max_line_length)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(start_smtp(self.factory, "127.0.0.1", 0), self.loop).result()
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server(tmp_path: Path, ca: trustme.CA) -> Iterator[InProcess]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.example.com", "127.0.0.1").configure_cert(context)
    srv = InProcess(tmp_path, context)
    yield srv
    srv.close()


def test_an_internal_error_is_451_4_3_0_and_reveals_nothing(server: InProcess) -> None:
    server.store.fail_accept = RuntimeError("disk on fire near ituki-ex@gmail.com")
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test") as client:
        client.ehlo()
        client.mail("a@sender.example")
        client.rcpt("ituki@example.com")
        code, text = client.data(message("doomed"))
        assert (code, text.split(b" ", 1)[0]) == (451, b"4.3.0")
        assert b"fire" not in text and b"gmail" not in text and b"RuntimeError" not in text
        server.store.fail_accept = None
        assert client.noop()[0] == 250  # the session goes on
    assert server.accepted == []


def test_starttls_is_offered_with_a_certificate_and_mail_flows_over_it(server: InProcess, ca: trustme.CA) -> None:
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test") as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=client_context)
        client.ehlo()
        assert not client.has_extn("starttls") and not client.has_extn("auth")
        client.sendmail("a@sender.example", ["ituki@example.com"], message("over tls"))
    [queue_id] = server.accepted
    _, stored = server.store.messages[queue_id]
    assert b"with ESMTPS id " + queue_id.encode() in stored


def test_library_replies_get_enhanced_status_codes() -> None:
    assert translate("503 Error: need RCPT command") == "503 5.5.1 Need RCPT command first"
    assert translate("552 Error: Too much mail data") == "552 5.3.4 Message size exceeds the fixed limit"
    assert translate('500 Error: command "FOO" not recognized') == '500 5.5.2 command "FOO" not recognized'
    assert translate("550 5.1.1 already enhanced") == "550 5.1.1 already enhanced"
    assert translate("220 mx.example.com ESMTP") == "220 mx.example.com ESMTP"


def test_the_redactor_is_built_from_every_forward_target(tmp_path: Path) -> None:
    from maildetour.wiring import private_addresses

    private = private_addresses(seed_config(tmp_path))
    assert {"ituki-ex@gmail.com", "ituki@pc.example.net", "ituki@gm.example.net"} <= private
    assert not Redactor(private).leaks(Redactor(private).scrub("to ituki-ex@gmail.com"))
