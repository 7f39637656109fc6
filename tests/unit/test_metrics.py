"""Metrics (issue 11): what is counted under which label, the scheduler's counts and gauges,
the HTTP endpoint (/metrics, /healthz, /readyz and its limits), `[metrics]` in the config and
the store's health check. Parsed with prometheus_client's own parsers, never by hand."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

import pytest
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from maildetour.config import ConfigError
from maildetour.core import replies
from maildetour.core.destinations import Destination
from maildetour.core.hostport import HostPort
from maildetour.core.outcome import Delivered, PermanentFailure, TemporaryFailure, Unreachable
from maildetour.core.policy import skipped
from maildetour.metrics import (
    CAUSES,
    OTHER,
    REFUSAL_REASONS,
    Metrics,
    detour_cause,
    exposition,
    refusal_reason,
)
from maildetour.metrics_endpoint import MAX_CONNECTIONS, MAX_REQUEST, start_endpoint
from maildetour.store.records import Copy, Event, Message, NewCopy
from maildetour.store.sqlite import SqliteStore
from tests.configs import SEED, seed_config
from tests.fakes import MemoryStore, ScriptedAgent
from tests.unit.test_scheduler import DETOUR, HIDDEN, PC, Clock, scheduler_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: Metrics) -> Samples:
    """Every sample of the text exposition, by (name, sorted labels)."""
    body, _ = exposition(metrics, "")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


# --- what a refusal and a detour are counted under ----------------------------------------------
def test_every_refusal_we_send_has_a_reason_of_its_own() -> None:
    named = [r for r in vars(replies).values() if isinstance(r, replies.Reply) and r.code >= 400]
    assert named
    for reply in named:
        assert refusal_reason(str(reply)) in REFUSAL_REASONS
        assert refusal_reason(str(reply)) != OTHER, reply
    assert refusal_reason(str(replies.UNKNOWN_USER)) == "unknown_user"
    assert refusal_reason(str(replies.TOO_MANY_SESSIONS)) == "too_many_connections"
    assert refusal_reason(str(replies.SESSION_REFUSED)) == "session_limit"
    assert refusal_reason(str(replies.CLIENT_MESSAGE_RATE)) == "rate_limit"


def test_library_replies_and_unknown_ones_fall_into_the_fixed_set() -> None:
    for line in replies.LIBRARY_REPLIES.values():
        assert refusal_reason(line) in REFUSAL_REASONS
    assert refusal_reason("553 5.1.3 Malformed address") == "bad_address"
    assert refusal_reason("503 5.5.1 Need MAIL command first") == "protocol"
    assert refusal_reason("500 5.5.2 Command line too long") == "line_too_long"
    assert refusal_reason("421 4.7.0 NOOP sent too many times") == "session_limit"
    assert refusal_reason("599 9.9.9 <someone@example.com> said no") == OTHER  # never the text itself


def test_the_detour_cause_comes_from_the_outcome() -> None:
    assert detour_cause(PermanentFailure("550 5.7.1 no")) == "refused"
    assert detour_cause(Unreachable("connection refused")) == "unreachable"
    assert detour_cause(TemporaryFailure("451 4.3.0 later")) == "deferred_too_long"
    dest = Destination("x@gmail.com", True, ("y@example.net",), 600.0, skip_when=("dmarc-fail",))
    refusal = skipped(dest, {"dmarc": "fail"})
    assert refusal is not None and detour_cause(refusal) == "skip_when"
    assert detour_cause(PermanentFailure("late bounce Q9: 5.7.1 refused after acceptance")) == "late_bounce"
    assert set(CAUSES) >= {"refused", "unreachable", "deferred_too_long", "skip_when", "late_bounce"}


# --- the Metrics object ------------------------------------------------------------------------
def test_counts_land_under_bounded_labels() -> None:
    metrics = Metrics([HIDDEN.upper()])
    metrics.accepted(2)
    metrics.accepted(1)
    metrics.refused(str(replies.UNKNOWN_USER))
    metrics.settled("sent", PC, Delivered("250 ok"), latency=0.2)
    metrics.settled("detoured", HIDDEN, PermanentFailure("550 no"), latency=1.0)
    metrics.settled("sent", DETOUR, Delivered("250 ok"), latency=3.0, detours=1)
    metrics.settled("deferred", "someone@else.example", TemporaryFailure("451"))
    metrics.pop3_login("ok")
    metrics.pop3_login("failed")
    metrics.late_bounce(matched=False)
    found = samples(metrics)
    assert value(found, "maildetour_smtp_accepted_messages_total") == 2
    assert value(found, "maildetour_smtp_accepted_recipients_total") == 3
    assert value(found, "maildetour_smtp_refused_total", reason="unknown_user") == 1
    assert value(found, "maildetour_copies_total", status="sent", destination=OTHER) == 2
    assert value(found, "maildetour_copies_total", status="detoured", destination=HIDDEN) == 1
    assert value(found, "maildetour_copies_total", status="deferred", destination=OTHER) == 1
    assert value(found, "maildetour_detours_total", destination=HIDDEN, cause="refused") == 1
    assert value(found, "maildetour_delivery_latency_seconds_count") == 1
    assert value(found, "maildetour_delivery_latency_seconds_bucket", le="0.25") == 1
    assert value(found, "maildetour_detour_latency_seconds_count") == 1
    assert value(found, "maildetour_detour_latency_seconds_sum") == 3.0
    assert value(found, "maildetour_pop3_logins_total", result="ok") == 1
    assert value(found, "maildetour_pop3_logins_total", result="throttled") == 0  # present from the start
    assert ("maildetour_pop3_logins_total", (("result", "throttled"),)) in found
    assert value(found, "maildetour_late_bounces_total", result="unmatched") == 1
    # No address but the configured destination's appears in any label.
    labels = {v for _, pairs in found for _, v in pairs}
    assert PC not in labels and DETOUR not in labels and "someone@else.example" not in labels


def test_a_reload_changes_which_destinations_get_a_label() -> None:
    metrics = Metrics([HIDDEN])
    metrics.configure(["new@gmail.com"])
    metrics.settled("deferred", HIDDEN, TemporaryFailure("451"))
    metrics.settled("deferred", "New@Gmail.com", TemporaryFailure("451"))
    found = samples(metrics)
    assert value(found, "maildetour_copies_total", status="deferred", destination=OTHER) == 1
    assert value(found, "maildetour_copies_total", status="deferred", destination="new@gmail.com") == 1


def test_each_metrics_object_has_its_own_registry_and_the_global_one_is_untouched() -> None:
    first, second = Metrics(), Metrics()
    first.accepted(1)
    assert value(samples(second), "maildetour_smtp_accepted_messages_total") == 0
    assert REGISTRY.get_sample_value("maildetour_smtp_accepted_messages_total") is None


def test_queue_gauges_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    state = {"depth": 0, "age": 0.0}
    metrics.watch_queue(lambda: state["depth"], lambda: state["age"])
    assert value(samples(metrics), "maildetour_queue_copies") == 0
    state.update(depth=7, age=1800.0)
    found = samples(metrics)
    assert value(found, "maildetour_queue_copies") == 7
    assert value(found, "maildetour_queue_oldest_age_seconds") == 1800.0


def test_openmetrics_is_served_when_asked_for() -> None:
    metrics = Metrics()
    metrics.accepted(1)
    body, content_type = exposition(metrics, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(body.decode())}
    [sample] = [s for s in families["maildetour_smtp_accepted_messages"].samples if s.name.endswith("_total")]
    assert sample.value == 1
    text, plain = exposition(metrics, "text/plain")
    assert plain.startswith("text/plain") and b"# EOF" not in text


# --- the scheduler counts what each attempt led to -----------------------------------------------
def test_the_scheduler_counts_a_refused_hidden_copy_as_detoured_then_sent(tmp_path: Path) -> None:
    config = seed_config(tmp_path, SEED)
    store, clock = MemoryStore(), Clock()
    smtp = ScriptedAgent(lambda r, n: PermanentFailure("550 5.7.0 virus"))
    local = ScriptedAgent(lambda r, n: Delivered("250 ok"))
    scheduler = scheduler_for(config, store, smtp, local, clock)
    metrics = scheduler.metrics = Metrics(config.destinations)
    metrics.watch_queue(scheduler.queue_depth, scheduler.oldest_age)
    table = config.routing_table()
    during: list[Samples] = []

    async def main() -> None:
        task = asyncio.create_task(scheduler.run())
        message = Message("Q1", "alice@sender.example", clock.now - 90, "<m@x>", 10, "c [127.0.0.1]")
        new = [NewCopy("ituki@example.com", t, table.is_hidden(t)) for t in (PC, HIDDEN)]
        made = await store.accept(message, b"Subject: hi\r\n\r\nbody\r\n", new, [Event(clock.now, "Q1", None,
                                                                                      "accepted", "", "")])
        during.append(samples(metrics))  # before the loop has run: both copies queued
        scheduler.submit(made)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if store.finished:
                break
        task.cancel()

    asyncio.run(main())
    found = samples(metrics)
    assert value(found, "maildetour_copies_total", status="detoured", destination=HIDDEN) == 1
    assert value(found, "maildetour_detours_total", destination=HIDDEN, cause="refused") == 1
    assert value(found, "maildetour_copies_total", status="sent", destination=OTHER) == 2  # PC, then the detour
    assert value(found, "maildetour_delivery_latency_seconds_count") == 1
    assert value(found, "maildetour_detour_latency_seconds_count") == 1
    assert value(found, "maildetour_detour_latency_seconds_sum") == 90.0  # the clock stood still
    assert value(found, "maildetour_queue_copies") == 0
    assert value(found, "maildetour_queue_oldest_age_seconds") == 0


def test_queue_gauges_follow_the_scheduler(tmp_path: Path) -> None:
    config = seed_config(tmp_path, SEED)
    clock = Clock()
    scheduler = scheduler_for(config, None, None, None, clock)  # type: ignore[arg-type]
    copies = [Copy(i, f"Q{i}", "a@b.example", "r@example.com", PC, PC, False, "queued", 0, clock.now, None, 0,
                   clock.now - age) for i, age in ((1, 30.0), (2, 600.0))]
    scheduler.submit(copies)
    assert scheduler.queue_depth() == 2 and scheduler.oldest_age() == 600.0


# --- the endpoint ----------------------------------------------------------------------------------
async def _get(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


def _request(path: str, method: str = "GET", accept: str = "") -> bytes:
    extra = f"Accept: {accept}\r\n" if accept else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def test_the_endpoint_serves_metrics_health_and_readiness() -> None:
    metrics = Metrics()
    metrics.accepted(4)
    problem: list[str | None] = ["the store's writer is not running"]

    async def main() -> None:
        endpoint = await start_endpoint(metrics, lambda: problem[0], "127.0.0.1", 0)
        port = endpoint.address[1]
        try:
            status, headers, body = await _get(port, _request("/metrics"))
            assert status == 200 and headers["content-type"].startswith("text/plain")
            assert int(headers["content-length"]) == len(body)
            families = {f.name: f for f in text_string_to_metric_families(body.decode())}
            assert families["maildetour_smtp_accepted_recipients"].samples[0].value == 4
            status, headers, body = await _get(port, _request("/metrics?x=1", accept="application/openmetrics-text"))
            assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
            assert list(parse_openmetrics(body.decode()))
            assert (await _get(port, _request("/healthz")))[::2] == (200, b"ok\n")
            status, _, body = await _get(port, _request("/readyz"))
            assert status == 503 and body == b"not ready: the store's writer is not running\n"
            problem[0] = None
            assert (await _get(port, _request("/readyz")))[::2] == (200, b"ready\n")
            status, headers, body = await _get(port, _request("/healthz", method="HEAD"))
            assert status == 200 and body == b"" and headers["content-length"] == "3"
            assert (await _get(port, _request("/")))[0] == 404
            assert (await _get(port, _request("/metrics", method="POST")))[0] == 405
            assert (await _get(port, b"junk\r\n\r\n"))[0] == 400
        finally:
            endpoint.close()

    asyncio.run(main())


def test_the_endpoint_bounds_request_size_and_connections() -> None:
    async def main() -> None:
        endpoint = await start_endpoint(Metrics(), lambda: None, "127.0.0.1", 0)
        port = endpoint.address[1]
        try:
            huge = b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"a" * (2 * MAX_REQUEST) + b"\r\n\r\n"
            assert (await _get(port, huge))[0] == 431
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
            await _until(lambda: len(endpoint._writers) == MAX_CONNECTIONS)  # the server holds them all
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                assert await reader.read() == b""  # one too many: closed unanswered
            except ConnectionResetError:
                pass
            writer.close()
            for _, held in idle:
                held.close()
            await _until(lambda: not endpoint._writers)
            assert (await _get(port, _request("/healthz")))[0] == 200  # room again
        finally:
            endpoint.close()

    asyncio.run(main())


# --- config and the store's health ---------------------------------------------------------------
def test_metrics_are_off_unless_configured_and_listen_is_checked(tmp_path: Path) -> None:
    assert seed_config(tmp_path).metrics.listen is None
    config = seed_config(tmp_path, SEED + '[metrics]\nlisten = "127.0.0.1:9749"\n')
    assert config.metrics.listen == HostPort("127.0.0.1", 9749)
    assert seed_config(tmp_path, SEED + '[metrics]\nlisten = "[::1]:9749"\n').metrics.listen == HostPort("::1", 9749)
    with pytest.raises(ConfigError, match=r"^metrics\.listen: expected \"host:port\""):
        seed_config(tmp_path, SEED + '[metrics]\nlisten = "9749"\n')
    with pytest.raises(ConfigError, match=r"^metrics\.path: unknown key"):
        seed_config(tmp_path, SEED + '[metrics]\nlisten = "127.0.0.1:9749"\npath = "/m"\n')


def test_the_store_is_healthy_only_while_its_writer_runs(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteStore(tmp_path / "q.sqlite3", tmp_path / "spool", tmp_path / "audit.jsonl")
        assert store.health() == "the store's writer is not running"
        async with store.running():
            await asyncio.sleep(0)
            assert store.health() is None
        store.close()

    asyncio.run(main())
