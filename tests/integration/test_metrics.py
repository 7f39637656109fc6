"""Issue 11: the real `maildetour serve` with `[metrics] listen`, scraped over loopback.

A known mix goes in over real sockets — three messages accepted (one of which the stand-in
gmail refuses, so its hidden copy detours), one recipient refused at RCPT, a late DSN that
gmail sends about an accepted copy, POP3 logins that succeed and fail (poplib) — and /metrics,
parsed by prometheus_client's own parsers (text and OpenMetrics), shows exactly those counts.
/healthz and /readyz answer; the endpoint moves on reload only when `metrics.listen` changes,
and a port it cannot bind is a config error naming `metrics.listen`.
"""

from __future__ import annotations

import poplib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Server, late_dsn, message, running_server, seed_text
from tests.peers.ports import free_port
from tests.peers.sinks import running_sink

HIDDEN = "ituki-ex@gmail.com"
PC = "ituki@pc.example.net"
DETOUR = "ituki@gm.example.net"
OTHER = "other"
REFUSE = b"REFUSE-ME-AT-GMAIL"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_table(port: int) -> str:
    return f'[metrics]\nlisten = "127.0.0.1:{port}"\n'


def get(port: int, path: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of GET path."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept is not None:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def scrape(port: int) -> Samples:
    status, content_type, body = get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def counters(found: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every labelled value of one counter that is not 0."""
    return {labels: v for (n, labels), v in found.items() if n == name and v}


def scrape_until(port: int, done: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                 timeout: float = 20.0) -> Samples:
    """Scrape until every sample in `done` has its value (a copy is counted when its attempt
    settles, a moment after its mailbox file appears); return that scrape."""
    deadline = time.monotonic() + timeout
    while True:
        found = scrape(port)
        if all(found.get(key) == wanted for key, wanted in done.items()) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def refused_at_rcpt(server: Server, address: str) -> int:
    with server.smtp() as client:
        client.mail("alice@sender.example")
        return client.rcpt(address)[0]


def pop3_login(server: Server, user: str, password: str) -> bool:
    assert server.pop3_port is not None
    client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=15)
    try:
        client.user(user)
        client.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        client.quit()
    return True


def refuse(data: bytes) -> str | None:
    """The stand-in gmail refuses what carries the marker, at the end of DATA."""
    return "550 5.7.1 refused by the stand-in gmail" if REFUSE in data else None


def test_the_counters_match_what_was_sent(tmp_path: Path) -> None:
    port = free_port()
    with running_sink(refuse=refuse) as gmail, \
            running_server(tmp_path, gmail=f"{gmail.host}:{gmail.port}", pop3=True,
                           extra=metrics_table(port)) as server:
        assert get(port, "/healthz")[::2] == (200, "ok\n")
        assert get(port, "/readyz")[::2] == (200, "ready\n")
        server.send(message("first"))
        server.send(message("second"))
        server.send(message("refused by gmail", body=REFUSE + b"\r\n"))
        assert refused_at_rcpt(server, "nobody@example.com") == 550
        gmail.wait_for(2)
        server.wait_mailbox(PC, 3)
        server.wait_mailbox(DETOUR, 1)
        # Gmail accepted "first", then reports it refused: a late bounce to our SRS address.
        copy = next(m for m in gmail.messages if b"Subject: first" in m.data)
        server.send(late_dsn(to=copy.mail_from, reporter="gmail.com", final_recipient=HIDDEN,
                             returned=copy.data, marker="late-metrics"), sender="", to=(copy.mail_from,))
        server.wait_mailbox(DETOUR, 2)
        assert pop3_login(server, PC, "change-me")
        assert not pop3_login(server, PC, "wrong password")

        sent = ("maildetour_copies_total", (("destination", OTHER), ("status", "sent")))
        depth = ("maildetour_queue_copies", ())
        found = scrape_until(port, {sent: 5, depth: 0})
        openmetrics_status, openmetrics_type, openmetrics = get(port, "/metrics", "application/openmetrics-text")
        assert get(port, "/readyz")[::2] == (200, "ready\n")

    # SMTP in: 3 messages and the late DSN accepted, one recipient refused, nothing else refused.
    assert value(found, "maildetour_smtp_accepted_messages_total") == 4
    assert value(found, "maildetour_smtp_accepted_recipients_total") == 4
    assert counters(found, "maildetour_smtp_refused_total") == {(("reason", "unknown_user"),): 1}
    # Copies: to the PC box 3, to hidden gmail 2 taken, 1 refused -> detoured, 1 taken and then
    # bounced late -> detoured; both detoured copies delivered into the detour box.
    assert counters(found, "maildetour_copies_total") == {
        (("destination", OTHER), ("status", "sent")): 5,
        (("destination", HIDDEN), ("status", "sent")): 2,
        (("destination", HIDDEN), ("status", "detoured")): 2,
    }
    assert counters(found, "maildetour_detours_total") == {
        (("cause", "refused"), ("destination", HIDDEN)): 1,
        (("cause", "late_bounce"), ("destination", HIDDEN)): 1,
    }
    assert value(found, "maildetour_delivery_latency_seconds_count") == 5
    assert value(found, "maildetour_detour_latency_seconds_count") == 2
    assert value(found, "maildetour_delivery_latency_seconds_bucket", le="+Inf") == 5
    # POP3 and late bounces.
    assert counters(found, "maildetour_pop3_logins_total") == {(("result", "ok"),): 1, (("result", "failed"),): 1}
    assert counters(found, "maildetour_late_bounces_total") == {(("result", "matched"),): 1}
    # The queue is empty again.
    assert value(found, "maildetour_queue_copies") == 0
    assert value(found, "maildetour_queue_oldest_age_seconds") == 0
    # The same numbers in OpenMetrics, through its own parser.
    assert openmetrics_status == 200 and openmetrics_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(openmetrics)}
    assert [s.value for s in families["maildetour_smtp_accepted_messages"].samples if s.name.endswith("_total")] == [4]
    refused = {s.labels["reason"]: s.value for s in families["maildetour_smtp_refused"].samples
               if s.name.endswith("_total") and s.value}
    assert refused == {"unknown_user": 1}
    assert families["maildetour_queue_copies"].type == "gauge"


def test_the_endpoint_moves_on_reload_only_when_metrics_listen_changes(tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    with running_server(tmp_path, extra=metrics_table(first)) as server:
        server.send(message("counted before the reload", to=PC), to=(PC,))
        scrape_until(first, {("maildetour_smtp_accepted_messages_total", ()): 1})
        text = seed_text(smtp_port=server.smtp_port, pop3_port=None, gmail="127.0.0.2:9",
                         extra=metrics_table(second))
        assert reload(server, text) == "config reloaded"
        assert value(scrape(second), "maildetour_smtp_accepted_messages_total") == 1  # counts survive
        with pytest.raises(urllib.error.URLError):
            get(first, "/healthz")
        # A port that another process holds: the reload is refused whole; the endpoint stays.
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            text = seed_text(smtp_port=server.smtp_port, pop3_port=None, gmail="127.0.0.2:9",
                             extra=metrics_table(holder.getsockname()[1]))
            assert reload(server, text) == "reload refused"
            assert get(second, "/healthz")[0] == 200
        assert "reload refused, still serving the old config: metrics.listen: cannot listen on" in server.log()


def reload(server: Server, text: str) -> str:
    """Write `text`, send SIGHUP, and return which way the reload went."""
    assert server.proc is not None
    server.config.write_text(text, encoding="utf-8")
    outcomes = ("config reloaded", "reload refused")
    before = sum(server.log().count(o) for o in outcomes)
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while sum(server.log().count(o) for o in outcomes) == before:
        assert time.monotonic() < deadline and server.proc.poll() is None, server.log()
        time.sleep(0.02)
    last = [line for line in server.log().splitlines() if any(o in line for o in outcomes)][-1]
    return next(o for o in outcomes if o in last)


def test_a_metrics_port_in_use_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "maildetour.toml"
        config.write_text(seed_text(smtp_port=free_port(), pop3_port=None, gmail="127.0.0.2:9",
                                    extra=metrics_table(port)), encoding="utf-8")
        result = subprocess.run([sys.executable, "-m", "maildetour.cli", "serve", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 1
    assert f"config error: metrics.listen: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_no_metrics_table_means_no_endpoint(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        assert "metrics on" not in server.log()
