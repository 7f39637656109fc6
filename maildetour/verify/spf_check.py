"""SPF (RFC 7208) of a received message with pyspf, its DNS fetched asynchronously.

What it does: `check_spf` runs pyspf's evaluation in the checks' worker pool with DNS taken
from a `lookups.View`; when pyspf asks for a name not fetched yet, the run stops, the name is
fetched on the event loop (with the addresses of MX and PTR targets pyspf will ask for next),
and the evaluation runs again from the start with everything fetched so far. pyspf's own limits
(10 DNS mechanisms, 2 void lookups, 10 MX/PTR names) bound the rounds; `MAX_ROUNDS` is a
backstop. A null sender is checked with the HELO identity (`postmaster@<helo>`), as pyspf does.

Contract: never uses pyspf's module-level resolver (its `query.dns` is replaced). The identity
and its domain (ASCII form) are returned for DMARC. Exposure: faces the internet (the records
are the sender's). Failure: never raises: DNS trouble or the deadline is `temperror`, a broken
record `permerror`, anything unexpected from pyspf `temperror`.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.rdata
import spf

from maildetour.verify.lookups import MessageDns, NeedLookup, View
from maildetour.verify.names import ascii_name, organizational_domain

__all__ = ["MAX_ROUNDS", "SpfVerdict", "check_spf"]

# Evaluations of one message's SPF: each finds at most one name not fetched before, and pyspf
# stops at about 10 mechanism lookups (MX and PTR targets are fetched with their parents).
MAX_ROUNDS = 40


@dataclass(frozen=True, slots=True)
class SpfVerdict:
    result: str  # pass, fail, softfail, neutral, none, temperror, permerror
    identity: str  # the address checked: MAIL FROM, or postmaster@<helo> for a null sender
    domain: str  # its domain in ASCII form ("" if it has none), for DMARC alignment
    org: str  # organizational domain of `domain`


async def check_spf(dns: MessageDns, *, ip: str, helo: str, mail_from: str, receiver: str) -> SpfVerdict:
    identity = mail_from or (f"postmaster@{helo}" if helo else "")
    fallback = _verdict("temperror", identity)
    for _ in range(MAX_ROUNDS):
        view = dns.view()
        try:
            verdict = await dns.run(_evaluate, view, ip, helo, mail_from, receiver)
        except Exception:  # a bug in the round itself: unknown means temporary
            return fallback
        if not view.missing:
            return verdict
        if dns.left() <= 0:
            return fallback
        await dns.fetch_all(view.missing)
        await _fetch_targets(dns, view.missing, ip)
    return fallback


async def _fetch_targets(dns: MessageDns, fetched: list[tuple[str, str]], ip: str) -> None:
    """MX and PTR answers are followed by address lookups of each name: fetch them at once."""
    family = "AAAA" if ":" in ip and not ip.lower().startswith("::ffff:") else "A"
    follow: list[tuple[str, str]] = []
    for name, rdtype in fetched:
        if rdtype not in ("MX", "PTR"):
            continue
        answer = await dns.fetch(name, rdtype)
        for record in answer.records[:10]:
            target = record.exchange if rdtype == "MX" else record.target  # type: ignore[attr-defined]
            follow.append((target.to_text(omit_final_dot=True), family))
    await dns.fetch_all(follow)


def _evaluate(view: View, ip: str, helo: str, mail_from: str, receiver: str) -> SpfVerdict:
    """Blocking (CPU only): one pyspf evaluation with the DNS answers in `view`."""
    try:
        query = _SpfQuery(view, i=ip, s=mail_from, h=helo, receiver=receiver)
        word, _code, _explanation = query.check()
        identity = str(query.s)
    except NeedLookup:
        word, identity = "temperror", mail_from
    except Exception:  # pyspf raises for addresses it cannot parse; unknown means temporary
        word, identity = "temperror", mail_from or (f"postmaster@{helo}" if helo else "")
    return _verdict(str(word), identity)


def _verdict(word: str, identity: str) -> SpfVerdict:
    domain = ascii_name(identity.rpartition("@")[2]) or "" if identity else ""
    return SpfVerdict(word, identity, domain, organizational_domain(domain) if domain else "")


class _SpfQuery(spf.query):  # type: ignore[misc]
    """pyspf's query with its DNS answered from a `View` instead of its module resolver."""

    def __init__(self, view: View, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._view = view

    def dns(self, name: str, qtype: str, cnames: object = None, ignore_void: bool = False) -> list[object]:
        """Same contract as pyspf's `query.dns` (list of values, void lookups counted)."""
        answer = self._view.get(str(name), qtype)  # NeedLookup: fetched, then evaluated again
        if answer.temporary is not None:
            raise spf.TempError(f"DNS {answer.temporary}")
        result = [_spf_value(qtype, r) for r in answer.records]
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def _spf_value(qtype: str, rdata: dns.rdata.Rdata) -> object:
    """A record in the shape pyspf's own dnspython lookup produces."""
    match qtype:
        case "A" | "AAAA":
            return rdata.address  # type: ignore[attr-defined]
        case "MX":
            return (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
        case "PTR":
            return rdata.target.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
        case _:  # TXT, SPF
            return list(rdata.strings)  # type: ignore[attr-defined]
