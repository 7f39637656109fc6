"""The DNS of one message's checks: asynchronous queries, answers kept for the message, one
deadline, and a synchronous view of the answers for the libraries that run in worker threads.

What it does: `MessageDns.fetch` asks the resolver (awaited on the event loop, so a query that
never gets an answer holds no thread), remembers the answer for the rest of the message (the
same name asked twice is one query, even when both ask at once), and gives every query at most
the time left until the message's deadline. `MessageDns.view()` hands a `View` to code running
in a worker thread (pyspf, dkimpy): it answers from what was fetched, and a name not fetched
yet is noted and raises `NeedLookup`; the caller fetches the noted names and runs the work
again. So the libraries never wait for the network inside a thread, and the checks' worker
pool is only ever busy with CPU work. `MessageDns.run` runs such work in that pool.

Resolvers: a `dns.asyncresolver.Resolver` is used as it is; a plain `dns.resolver.Resolver`
(what `app.py` builds today) is copied into an asynchronous one with the same servers, ports,
timeouts and cache; any other (sub)class may behave in ways a copy would lose, so its blocking
`resolve` is called in the worker pool (still bounded by the deadline).

Contract: every query goes to the given resolver only (never the machine's resolv.conf). No
global state. Exposure: the names come from messages (SPF records, DKIM tags, From domains);
they are put in ASCII form and length-checked (`names.ascii_name`) before any query.

Failure: no record (NXDOMAIN, no answer, a name that cannot be a DNS name) is an empty
`Answer`; a timeout, a server failure, or a spent deadline is an `Answer` with `temporary` set.
Nothing raises except `NeedLookup`, which is the view's way of asking for a name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype
import dns.resolver

from maildetour.verify.names import ascii_name

__all__ = ["Answer", "MessageDns", "NeedLookup", "View"]

P = ParamSpec("P")
T = TypeVar("T")
Key = tuple[str, str]  # (ascii name, record type)

_NO_NAME = ""  # the key name of everything that is not a DNS name


@dataclass(frozen=True, slots=True)
class Answer:
    """The records of one (name, type), or why there are none for now."""

    records: tuple[dns.rdata.Rdata, ...] = ()
    temporary: str | None = None  # set: could not be had now (timeout, SERVFAIL, deadline)


class NeedLookup(Exception):
    """A view was asked for a name that is not fetched yet (see `View.missing`)."""


@dataclass(slots=True)
class View:
    """Synchronous read access to the answers of one `MessageDns`, for a worker thread."""

    _answers: dict[Key, Answer]
    missing: list[Key] = field(default_factory=list)

    def get(self, name: str | bytes, rdtype: str) -> Answer:
        """The answer for (name, rdtype); raises NeedLookup (and notes it) if not fetched."""
        key = _key(name, rdtype)
        if key[0] == _NO_NAME:
            return Answer()
        found = self._answers.get(key)
        if found is None:
            if key not in self.missing:
                self.missing.append(key)
            raise NeedLookup(f"{key[0]} {key[1]}")
        return found


class MessageDns:
    """DNS for one message's checks, all done by `deadline` (the running loop's time)."""

    def __init__(self, resolver: dns.resolver.Resolver | dns.asyncresolver.Resolver, *,
                 deadline: float, workers: Executor) -> None:
        self._sync: dns.resolver.Resolver | None = None
        if isinstance(resolver, dns.asyncresolver.Resolver):
            self._async: dns.asyncresolver.Resolver | None = resolver
        elif type(resolver) is dns.resolver.Resolver:
            self._async = dns.asyncresolver.Resolver(configure=False)
            self._async.__dict__.update(vars(resolver))  # same servers, ports, timeouts, cache
        else:
            self._async, self._sync = None, resolver
        self.deadline = deadline
        self.workers = workers
        self._answers: dict[Key, Answer] = {}
        self._pending: dict[Key, asyncio.Future[Answer]] = {}

    def view(self) -> View:
        return View(self._answers)

    def left(self) -> float:
        """Seconds until the deadline (negative once it passed)."""
        return self.deadline - asyncio.get_running_loop().time()

    async def run(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`work(*args)` in the checks' worker pool (CPU work: parsing, hashing, signatures)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.workers, lambda: work(*args, **kwargs))

    async def fetch(self, name: str | bytes, rdtype: str) -> Answer:
        key = _key(name, rdtype)
        if key[0] == _NO_NAME:
            return Answer()
        if (found := self._answers.get(key)) is not None:
            return found
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._query(key))
            self._pending[key] = pending
        answer = await asyncio.shield(pending)  # one waiter giving up does not cancel it
        self._answers[key] = answer
        self._pending.pop(key, None)
        return answer

    async def fetch_all(self, keys: list[Key]) -> None:
        await asyncio.gather(*(self.fetch(name, rdtype) for name, rdtype in keys))

    async def _query(self, key: Key) -> Answer:
        name, rdtype = key
        lifetime = self.left()
        if lifetime <= 0:
            return Answer(temporary="DNS time budget spent")
        qname = dns.name.from_text(name)
        kind = dns.rdatatype.from_text(rdtype)
        try:
            if self._async is not None:
                answer = await self._async.resolve(qname, kind, lifetime=lifetime, search=False)
            else:
                assert self._sync is not None
                resolve = self._sync.resolve
                answer = await asyncio.wait_for(
                    self.run(resolve, qname, kind, lifetime=lifetime, search=False), lifetime + 0.5)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            return Answer()
        except (dns.exception.Timeout, TimeoutError):
            return Answer(temporary=f"DNS timeout for {name} {rdtype}")
        except dns.resolver.NoNameservers:
            return Answer(temporary=f"DNS server failure for {name} {rdtype}")
        except dns.exception.DNSException as exc:  # anything else the resolver can say: later
            return Answer(temporary=f"DNS error for {name} {rdtype}: {type(exc).__name__}")
        return Answer(records=tuple(answer))


def _key(name: str | bytes, rdtype: str) -> Key:
    text = ascii_name(name)
    if text is None:
        return _NO_NAME, rdtype
    try:
        dns.name.from_text(text)  # the checks dnspython makes (label and name lengths)
    except dns.exception.DNSException:
        return _NO_NAME, rdtype
    return text, rdtype.upper()
