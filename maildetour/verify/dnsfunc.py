"""Blocking DNS lookups for dkimpy through *our* dnspython resolver (ARC signing).

What it does: `DnsLookup` wraps a `dns.resolver.Resolver` (built by the caller, never the
default one: the machine's resolv.conf must not be used) into the callables libraries accept
— `lookup(name, timeout=...)` returning the TXT record as bytes for dkimpy's `dnsfunc=`
(ARC sealing validates the chain it extends with it), and `lookup.records(name, rdtype)`. An optional deadline bounds the total time of all lookups
made through one instance. The inbound checks do not use it: their DNS is asynchronous
(`verify.lookups`), so a slow domain holds no thread. `pick_txt` chooses the one TXT record a
library takes, for both.

Contract: blocking (dnspython's synchronous resolver) — call it from a worker thread, never on
the event loop. No caching beyond what the given resolver does. No globals.

Exposure: internal, but the names looked up come from messages (DKIM d=/s=, From domain), so
they are validated by dnspython before any query leaves.

Failure: "no such record" (NXDOMAIN, no answer, a name that is not a valid DNS name) is
`None` / `[]`. A timeout, SERVFAIL or exhausted deadline raises `DnsTemporaryError`, a
subclass of `dns.exception.DNSException`, so callers map it to `temperror`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype
import dns.resolver

__all__ = ["DnsLookup", "DnsTemporaryError", "pick_txt"]

class DnsTemporaryError(dns.exception.DNSException):
    """The answer could not be had now (timeout, SERVFAIL, time budget spent)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class DnsLookup:
    """Lookups through `resolver`; each query gets at most `timeout` seconds (the config's
    `checks.timeout`) and none starts after `deadline` (a `time.monotonic()` value, or None
    for no overall limit)."""

    resolver: dns.resolver.Resolver
    timeout: float
    deadline: float | None = None

    @classmethod
    def with_budget(cls, resolver: dns.resolver.Resolver, seconds: float) -> DnsLookup:
        """All lookups through the result must finish within `seconds` from now."""
        return cls(resolver, timeout=seconds, deadline=time.monotonic() + seconds)

    def records(self, name: str | bytes, rdtype: str) -> list[dns.rdata.Rdata]:
        """All records of `rdtype` at `name` (CNAMEs followed by the resolver); [] if none."""
        qname = _qname(name)
        if qname is None:
            return []
        lifetime = self._lifetime()
        try:
            answer = self.resolver.resolve(
                qname, dns.rdatatype.from_text(rdtype), lifetime=lifetime, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            return []
        except dns.exception.Timeout as exc:
            raise DnsTemporaryError(f"DNS timeout for {qname} {rdtype}") from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(f"DNS server failure for {qname} {rdtype}") from exc
        return list(answer)

    def __call__(self, name: str | bytes, timeout: float | None = None) -> bytes | None:
        """dkimpy's `dnsfunc`: the TXT record at `name` as bytes, None if there is none.
        dkimpy's own `timeout` is ignored: ours (and the deadline) apply."""
        del timeout
        texts = [b"".join(r.strings) for r in self.records(name, "TXT")]  # type: ignore[attr-defined]
        return pick_txt(texts)

    def _lifetime(self) -> float:
        if self.deadline is None:
            return self.timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DnsTemporaryError("DNS time budget spent")
        return min(self.timeout, left)


def _qname(name: str | bytes) -> dns.name.Name | None:
    try:
        text = name.decode("ascii") if isinstance(name, bytes) else name
        return dns.name.from_text(text)
    except (UnicodeDecodeError, dns.exception.DNSException):
        return None


def pick_txt(texts: list[bytes]) -> bytes | None:
    """One TXT record for libraries that take one: the first tagged one ("v=..."), else the
    first. (A DKIM key or DMARC name rarely holds more than one record.)"""
    for text in texts:
        if text.lstrip().lower().startswith(b"v="):
            return text
    return texts[0] if texts else None
