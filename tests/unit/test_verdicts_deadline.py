"""One deadline per message for all the inbound checks (issue 10 #6), without dnsmasq: a
loopback UDP port that never answers, and a worker pool that is busy."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import dns.resolver
import pytest

from maildetour.verify.verdicts import check

MESSAGE = (b"From: Alice <alice@sender.example>\r\nTo: bob@fwd.example\r\nSubject: x\r\n"
           b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.example; s=s1; h=from; bh=AAAA; b=AAAA\r\n"
           b"\r\nbody\r\n")


@pytest.fixture
def silent() -> Iterator[dns.resolver.Resolver]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = sink.getsockname()[1]
        yield resolver


def run(resolver: dns.resolver.Resolver, timeout: float, workers: ThreadPoolExecutor | None = None) -> tuple[str, float]:
    async def scenario() -> tuple[str, float]:
        started = time.monotonic()
        verdicts = await check(MESSAGE, client_ip="192.0.2.1", helo="mail.sender.example",
                               mail_from="alice@sender.example", authserv_id="mx.test",
                               resolver=resolver, timeout=timeout, workers=workers)
        return f"{verdicts.spf} {verdicts.dkim} {verdicts.dmarc}", time.monotonic() - started

    return asyncio.run(scenario())


def test_silent_dns_ends_all_checks_at_one_deadline(silent: dns.resolver.Resolver) -> None:
    """Issue 10 #6: not one budget per stage (SPF and DKIM, then DMARC): one for the message."""
    words, took = run(silent, timeout=1.0)
    assert words == "temperror temperror temperror"
    assert 0.9 < took < 1.9, f"{took:.2f} s for a 1 s deadline"


def test_a_busy_worker_pool_cannot_hold_a_message_past_its_deadline(silent: dns.resolver.Resolver) -> None:
    """Issue 10 #6: if the checks' CPU pool is busy, the message still goes on at the
    deadline (plus a short grace), with temperror, and DMARC does not claim a fail."""
    pool = ThreadPoolExecutor(1)
    release = threading.Event()
    pool.submit(release.wait, 30)
    try:
        words, took = run(silent, timeout=0.5, workers=pool)
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert words == "temperror temperror temperror"
    assert took < 3.0
