"""Inbound SPF, DKIM and DMARC verdicts, written as one Authentication-Results header.

What it does: `check` evaluates a received message — SPF for the connecting IP and MAIL FROM
(`spf_check`, pyspf; the HELO identity for a null sender), every DKIM signature (`dkim_check`,
dkimpy, up to `MAX_SIGNATURES`), DMARC for the From domain(s) (`dmarc`, our own RFC 7489 code)
— and returns `Verdicts` with one result word each and the Authentication-Results value under
our authserv-id: `spf=... smtp.helo=... smtp.mailfrom=<the whole MAIL FROM address>`, one
`dkim=` per signature (`dkim=none` for an unsigned message), `dmarc=... header.from=<domain>`.
(Incoming fields that claim our authserv-id are removed before ours is added:
`core.authres.strip_our_results`.)

Contract: one deadline per message — `timeout` seconds from the call, for all the checks
together (the config's `[checks] timeout`). SPF, DKIM and the DMARC policy lookups run side by
side; every DNS query is awaited on the event loop through the injected resolver (never a
library's default one), so a domain whose DNS never answers holds no thread; the libraries'
CPU work runs in a small pool of its own (`workers`, else `shared_workers()`), never in the
default pool that spool writes and deliveries use. When the deadline passes, what is not known
yet is `temperror` and `check` returns (at most `_GRACE` later, for CPU work in flight): one
slow sender delays only its own message.

Exposure: faces the internet — the message, MAIL FROM, HELO and every name looked up are
chosen by the sender. Limits: `MAX_SIGNATURES` signatures checked; pyspf keeps RFC 7208's
lookup limits (10 mechanisms, 2 void lookups); `dmarc.MAX_AUTHORS` From domains.

Failure: never raises for bad input. A DNS timeout or server failure gives `temperror` for
the check that needed it; a broken record `permerror`; an unexpected exception in a check is
logged and treated as temporary (`temperror`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import dns.asyncresolver
import dns.resolver
from authres import AuthenticationResultsHeader, DKIMAuthenticationResult, SPFAuthenticationResult
from authres.core import AuthenticationResult
from authres.dmarc import DMARCAuthenticationResult

from maildetour.verify.dkim_check import MAX_SIGNATURES, DkimVerdict, check_dkim
from maildetour.verify.dmarc import (
    Author, Discovered, DmarcVerdict, combine, discover, evaluate, read_authors)
from maildetour.verify.lookups import MessageDns
from maildetour.verify.spf_check import SpfVerdict, check_spf

__all__ = ["CHECK_WORKERS", "MAX_SIGNATURES", "Verdicts", "check", "shared_workers"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Threads for the checks' CPU work (pyspf's evaluation, DKIM hashing and signature checks,
# parsing). No DNS wait holds one, so two are enough to use both cores of a small host, and
# the checks of a flood cannot take the threads of the spool or the deliveries.
CHECK_WORKERS = 2
# After the deadline, CPU work already running (a body hash of a 25 MB message takes well
# under a second) may still finish; past this, it is given up as temperror.
_GRACE = 1.0
_DKIM_ORDER = ("pass", "temperror", "fail", "permerror", "none")

_shared: ThreadPoolExecutor | None = None
_shared_lock = threading.Lock()


def shared_workers() -> Executor:
    """The checks' pool for callers that do not bring their own (`check(workers=None)`)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ThreadPoolExecutor(CHECK_WORKERS, "maildetour-checks")
        return _shared


@dataclass(frozen=True, slots=True)
class Verdicts:
    """One word each (RFC 8601 result values) and the header value that says it all."""

    spf: str
    dkim: str
    dmarc: str
    authentication_results: str  # value only: "authserv-id; spf=...; dkim=...; dmarc=..."
    dkim_domains: tuple[str, ...] = ()  # d= of the signatures that passed
    dmarc_policy: str = ""  # the policy the From domain asks for, when it publishes one

    def field(self, linesep: bytes = b"\r\n") -> bytes:
        """The whole header field, folded after each result, ending with `linesep`."""
        folded = self.authentication_results.replace("; ", ";" + linesep.decode() + " ")
        return b"Authentication-Results: " + folded.encode("utf-8") + linesep


async def check(
    data: bytes,
    *,
    client_ip: str,
    helo: str,
    mail_from: str,
    authserv_id: str,
    resolver: dns.resolver.Resolver | dns.asyncresolver.Resolver,
    timeout: float = 5.0,
    workers: Executor | None = None,
) -> Verdicts:
    """SPF, DKIM and DMARC verdicts for a received message (see the module header)."""
    loop = asyncio.get_running_loop()
    pool = shared_workers() if workers is None else workers
    lookups = MessageDns(resolver, deadline=loop.time() + timeout, workers=pool)
    spf_task = asyncio.ensure_future(
        check_spf(lookups, ip=client_ip, helo=helo, mail_from=mail_from, receiver=authserv_id))
    dkim_task = asyncio.ensure_future(check_dkim(lookups, data))
    policy_task = asyncio.ensure_future(_policies(lookups, data))
    tasks = (spf_task, dkim_task, policy_task)
    try:
        await asyncio.wait(tasks, timeout=max(lookups.left(), 0) + _GRACE)
    finally:  # past the deadline, or the session went away: nothing of this message goes on
        for task in tasks:
            task.cancel()
    identity = mail_from or (f"postmaster@{helo}" if helo else "")
    spf = _outcome(spf_task, "SPF", SpfVerdict("temperror", identity, "", ""))
    dkim_results = _outcome(dkim_task, "DKIM", [DkimVerdict(
        "temperror", "checks took too long", None, None, None, None, "", "")])
    policies = _outcome(policy_task, "DMARC", DmarcVerdict("temperror", "", reason="checks took too long"))
    if isinstance(policies, DmarcVerdict):
        dmarc = policies
    else:
        dmarc = combine([evaluate(author, found, spf, dkim_results) for author, found in policies])
    unfinished = not (_finished(spf_task) and _finished(dkim_task))
    if dmarc.result == "fail" and unfinished:  # unknown is not forged: what would it have said?
        dmarc = replace(dmarc, result="temperror", reason="checks took too long")
    return _verdicts(authserv_id, helo, mail_from, spf, dkim_results, dmarc)


async def _policies(lookups: MessageDns, data: bytes) -> list[tuple[Author, Discovered]] | DmarcVerdict:
    """The From domains and their DMARC policies (looked up while SPF and DKIM run)."""
    authors = await lookups.run(read_authors, data)
    if isinstance(authors, DmarcVerdict):
        return authors
    found = await asyncio.gather(*(discover(lookups, author) for author in authors))
    return list(zip(authors, found))


def _finished(task: asyncio.Future[T]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _outcome(task: Awaitable[T], name: str, otherwise: T) -> T:
    assert isinstance(task, asyncio.Future)
    if not task.done() or task.cancelled():
        return otherwise
    if (error := task.exception()) is not None:
        log.error("inbound %s check failed", name, exc_info=error)
        return otherwise
    result: T = task.result()
    return result


def _verdicts(authserv_id: str, helo: str, mail_from: str, spf: SpfVerdict,
              dkim_results: list[DkimVerdict], dmarc: DmarcVerdict) -> Verdicts:
    results: list[AuthenticationResult] = [
        SPFAuthenticationResult(result=spf.result, smtp_mailfrom=mail_from or None, smtp_helo=helo or None)]
    results += [DKIMAuthenticationResult(result=v.result, reason=v.reason, header_d=v.d, header_i=v.i,
                                         header_s=v.s, header_a=v.a) for v in dkim_results]
    if not dkim_results:
        results.append(DKIMAuthenticationResult(result="none"))
    results.append(DMARCAuthenticationResult(result=dmarc.result, result_comment=dmarc.comment,
                                             reason=dmarc.reason, header_from=dmarc.from_domain or None))
    header = str(AuthenticationResultsHeader(authserv_id=authserv_id, results=results))
    words = {v.result for v in dkim_results}
    passing = tuple(v.d for v in dkim_results if v.result == "pass" and v.d)
    return Verdicts(
        spf=spf.result,
        dkim=next((w for w in _DKIM_ORDER if w in words), "none"),
        dmarc=dmarc.result,
        authentication_results=header.partition(": ")[2],
        dkim_domains=tuple(dict.fromkeys(passing)),
        dmarc_policy=dmarc.policy if dmarc.result != "none" else "",
    )
