"""Reload (SIGHUP, `maildetour reload`): the real server switches config without dropping
anything, over real sockets. A config it cannot use leaves the running one in place."""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from tests.harness import Server, message, running_server, seed_text
from tests.peers.ports import free_port
from tests.peers.sinks import running_sink

PC = "ituki@pc.example.net"
APPLIED, REFUSED = "config reloaded", "reload refused"


def _outcomes(server: Server) -> list[str]:
    return [line for line in server.log().splitlines() if APPLIED in line or REFUSED in line]


def reload(server: Server, text: str | None = None, *, by_command: bool = False) -> str:
    """Write `text` as the server's config (if given), reload, and return the line the server
    logged about it (applied or refused)."""
    assert server.proc is not None
    if text is not None:
        server.config.write_text(text, encoding="utf-8")
    before = len(_outcomes(server))
    if by_command:
        result = server.cli("reload")
        assert result.returncode == 0, result.stderr
    else:
        server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while len(_outcomes(server)) == before:
        assert time.monotonic() < deadline and server.proc.poll() is None, server.log()
        time.sleep(0.02)
    [line] = _outcomes(server)[before:]
    return line


def config(server: Server, *, smtp_port: int | None = None, gmail: str = "127.0.0.2:9", extra: str = "") -> str:
    return seed_text(smtp_port=smtp_port or server.smtp_port, pop3_port=server.pop3_port, gmail=gmail,
                     extra=extra)


def rcpt_reply(port: int, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=15) as client:
        client.ehlo()
        client.mail("alice@sender.example")
        return client.rcpt(rcpt)[0]


def test_a_new_forward_is_used_by_sessions_after_the_reload(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        assert rcpt_reply(server.smtp_port, "new@example.com") == 550
        line = reload(server, config(server, extra='[forward."new@example.com"]\nto = ["ituki@pc.example.net"]\n'))
        assert APPLIED in line
        server.send(message("to the new address", to="new@example.com"), to=("new@example.com",))
        assert b"to the new address" in server.wait_mailbox(PC, 1)[0]


def test_a_session_open_across_a_reload_finishes_though_its_listener_is_closed(tmp_path: Path) -> None:
    """The old port is dropped and a new one added; the transaction begun before the reload
    on the old port still ends in a 250, and its message is delivered."""
    with running_server(tmp_path) as server:
        old_port, new_port = server.smtp_port, free_port()
        with smtplib.SMTP("127.0.0.1", old_port, local_hostname="client.test", timeout=15) as early:
            early.ehlo()
            early.mail("alice@sender.example")
            assert early.rcpt(PC)[0] == 250
            assert APPLIED in reload(server, config(server, smtp_port=new_port))
            assert early.data(message("begun before the reload", to=PC))[0] == 250
        assert b"begun before the reload" in server.wait_mailbox(PC, 1)[0]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", old_port), timeout=5)
        assert rcpt_reply(new_port, PC) == 250


def test_a_broken_config_keeps_the_old_one_and_logs_one_line_naming_the_key(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        good = server.config.read_text()
        line = reload(server, good.replace('max_message_size = "25MB"', 'max_message_size = "lots"'))
        assert REFUSED in line and "smtp.max_message_size" in line
        line = reload(server, good + "\n[smtp\n")
        assert REFUSED in line and "not valid TOML" in line
        assert server.proc is not None and server.proc.poll() is None
        server.send(message("still served", to=PC), to=(PC,))
        assert len(server.wait_mailbox(PC, 1)) == 1


def test_a_port_in_use_refuses_the_reload_and_the_old_listener_stays(tmp_path: Path) -> None:
    with running_server(tmp_path) as server, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        line = reload(server, config(server, smtp_port=busy))
        assert REFUSED in line and "smtp.listen" in line and f"127.0.0.1:{busy}" in line
        assert rcpt_reply(server.smtp_port, PC) == 250


def test_a_new_state_dir_is_refused_until_a_restart(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        line = reload(server, config(server).replace('state_dir = "var"', 'state_dir = "elsewhere"'))
        assert REFUSED in line and "server.state_dir" in line
        assert not (tmp_path / "elsewhere").exists()


def test_queued_copies_use_the_new_relay_on_their_next_attempt(tmp_path: Path) -> None:
    """A copy for a plain (not hidden) address waits on a dead relay; after the reload names a
    live one, a flush delivers it there."""
    fan = '[forward."fan@example.com"]\nto = ["bob@sender.example"]\n'
    with running_server(tmp_path, extra=fan, sender_sink="127.0.0.2:9") as server, running_sink() as sink:
        queue_id = server.send(message("waits for a relay", to="fan@example.com"), to=("fan@example.com",))
        server.wait_event(queue_id, "deferred", target="bob@sender.example")
        live = seed_text(smtp_port=server.smtp_port, pop3_port=None, gmail="127.0.0.2:9", extra=fan,
                         sender_sink=f"127.0.0.1:{sink.port}")
        assert APPLIED in reload(server, live)
        assert server.cli("queue", "--flush").returncode == 0
        [received] = sink.wait_for(1)
        assert b"waits for a relay" in received.data and received.rcpt_tos == ("bob@sender.example",)


def test_an_attempt_in_flight_during_a_reload_ends_normally(tmp_path: Path) -> None:
    """The sink takes two seconds to answer DATA; the reload comes meanwhile. The attempt ends
    with the old agent (closed only afterwards), once, and is recorded as sent."""
    fan = '[forward."fan@example.com"]\nto = ["bob@sender.example"]\n'
    with running_sink(delay=2.0) as sink:
        with running_server(tmp_path, extra=fan, sender_sink=f"127.0.0.1:{sink.port}") as server:
            queue_id = server.send(message("in flight", to="fan@example.com"), to=("fan@example.com",))
            deadline = time.monotonic() + 10
            while sink.data_attempts == 0:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.01)
            assert APPLIED in reload(server)
            server.wait_event(queue_id, "delivered", target="bob@sender.example")
            assert len(sink.messages) == 1 and sink.data_attempts == 1


def test_maildetour_reload_checks_the_config_before_signalling(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        good = server.config.read_text()
        server.config.write_text(good.replace('max_message_size = "25MB"', 'max_message_size = "lots"'))
        result = server.cli("reload")
        assert result.returncode == 1 and "smtp.max_message_size" in result.stderr
        assert _outcomes(server) == []  # never signalled
        assert APPLIED in reload(server, good, by_command=True)


def _pop3_tls_config(server: Server, tls_port: int, cert: Path, key: Path) -> str:
    text = config(server)
    return text.replace("[pop3]\n", f'[pop3]\nlisten_tls = ["127.0.0.1:{tls_port}"]\n'
                                    f'tls_cert = "{cert}"\ntls_key = "{key}"\n', 1)


def _served_certificate(port: int, ca: trustme.CA) -> bytes:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="mx.example.com") as tls:
            certificate = tls.getpeercert(binary_form=True)
            assert certificate is not None
            assert tls.recv(100).startswith(b"+OK")
            return certificate


def test_a_pop3_tls_listener_is_added_and_a_renewed_certificate_serves_the_next_client(tmp_path: Path) -> None:
    """What an ACME renewal hook does: new files, then a reload. The first reload adds the
    implicit-TLS listener; after the second, the same listener hands out the new certificate."""
    ca = trustme.CA()
    files = []
    for name in ("old", "new"):
        leaf = ca.issue_cert("mx.example.com")
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        files.append((cert, key, leaf.cert_chain_pems[0].bytes()))
    tls_port = free_port()
    with running_server(tmp_path / "server", pop3=True) as server:
        assert APPLIED in reload(server, _pop3_tls_config(server, tls_port, files[0][0], files[0][1]))
        assert ssl.DER_cert_to_PEM_cert(_served_certificate(tls_port, ca)).encode() == files[0][2]
        assert APPLIED in reload(server, _pop3_tls_config(server, tls_port, files[1][0], files[1][1]))
        assert ssl.DER_cert_to_PEM_cert(_served_certificate(tls_port, ca)).encode() == files[1][2]


def test_a_rotated_audit_log_is_written_anew_after_the_reload(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        server.send(message("before rotation", to=PC), to=(PC,))
        server.wait_mailbox(PC, 1)
        audit = server.state / "audit.jsonl"
        audit.rename(server.state / "audit.jsonl.1")
        assert APPLIED in reload(server)
        queue_id = server.send(message("after rotation", to=PC), to=(PC,))
        server.wait_mailbox(PC, 2)
        deadline = time.monotonic() + 10
        while not (audit.exists() and queue_id in audit.read_text()):
            assert time.monotonic() < deadline, "no new audit.jsonl after the reload"
            time.sleep(0.05)
        assert queue_id not in (server.state / "audit.jsonl.1").read_text()
