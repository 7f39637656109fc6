"""Inbound SPF, DKIM and DMARC verdicts, written as one Authentication-Results header.

What it does: `check` evaluates a received message — SPF for the connecting IP and MAIL FROM
(pyspf, or the HELO identity for a null sender), every DKIM signature (dkimpy, up to
`MAX_SIGNATURES`), DMARC for the From domain (authheaders, fed our SPF result and the best
passing DKIM result) — and returns `Verdicts` with one result word each and the
Authentication-Results value under our authserv-id. (Incoming fields that claim our
authserv-id are removed before ours is added: `core.authres.strip_our_results`.)

Contract: every DNS query goes through the injected dnspython resolver (never a library's
default resolver: pyspf's module-level DNSLookup is bypassed by overriding `query.dns`,
dkimpy and authheaders get `dnsfunc=`). The blocking work runs in worker threads
(`asyncio.to_thread`); SPF and DKIM run side by side, then DMARC; each of the two stages has
its own DNS time budget of `timeout` seconds, so `check` returns within about 2 x `timeout`.

Exposure: faces the internet — the message, MAIL FROM, HELO and every name looked up are
chosen by the sender. Limits: `MAX_SIGNATURES` signatures checked; pyspf keeps RFC 7208's
lookup limits (10 mechanisms, 2 void lookups).

Failure: never raises for bad input. A DNS timeout or server failure gives `temperror` for
the check that needed it; a broken record `permerror`; an unexpected library exception is
treated as temporary (`temperror`).
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from email.utils import getaddresses

import dkim
import dns.rdata
import dns.resolver
import spf
from authheaders import check_dmarc
from authheaders.dmarc_lookup import get_org_domain
from authres import AuthenticationResultsHeader, DKIMAuthenticationResult, SPFAuthenticationResult
from authres.core import AuthenticationResult
from authres.dmarc import DMARCAuthenticationResult
from dkim.util import parse_tag_value

from maildetour.verify.dnsfunc import DnsLookup, DnsTemporaryError

__all__ = ["MAX_SIGNATURES", "Verdicts", "check"]

MAX_SIGNATURES = 5  # DKIM signatures verified per message; more cost DNS and CPU for nothing
_DKIM_ORDER = ("pass", "temperror", "fail", "permerror", "none")


@dataclass(frozen=True, slots=True)
class Verdicts:
    """One word each (RFC 8601 result values) and the header value that says it all."""

    spf: str
    dkim: str
    dmarc: str
    authentication_results: str  # value only: "authserv-id; spf=...; dkim=...; dmarc=..."
    dkim_domains: tuple[str, ...] = ()  # d= of the signatures that passed
    dmarc_policy: str = ""  # the policy applied when dmarc != "none" (none/quarantine/reject)

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
    resolver: dns.resolver.Resolver,
    timeout: float = 5.0,
) -> Verdicts:
    """SPF, DKIM and DMARC verdicts for a received message (see the module header)."""
    spf_task = asyncio.to_thread(_spf, resolver, timeout, client_ip, helo, mail_from, authserv_id)
    dkim_task = asyncio.to_thread(_dkim, resolver, timeout, data)
    spf_result, dkim_results = await asyncio.gather(spf_task, dkim_task)
    dmarc_result = await asyncio.to_thread(_dmarc, resolver, timeout, data, spf_result, dkim_results)
    results: list[AuthenticationResult] = [spf_result.public, *dkim_results, dmarc_result]
    header = str(AuthenticationResultsHeader(authserv_id=authserv_id, results=results))
    passing = tuple(str(r.header_d) for r in dkim_results if r.result == "pass")
    return Verdicts(
        spf=spf_result.public.result,
        dkim=_dkim_word(dkim_results),
        dmarc=dmarc_result.result,
        authentication_results=header.partition(": ")[2],
        dkim_domains=tuple(dict.fromkeys(passing)),
        dmarc_policy=dmarc_result.policy or "",
    )


# -- SPF --------------------------------------------------------------------------------------


class _SpfQuery(spf.query):  # type: ignore[misc]
    """pyspf's query with its DNS taken from our resolver instead of its module default."""

    def __init__(self, lookup: DnsLookup, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._lookup = lookup

    def dns(self, name: str, qtype: str, cnames: object = None, ignore_void: bool = False) -> list[object]:
        """Same contract as pyspf's `query.dns` (list of values, void lookups counted)."""
        name = str(name).rstrip(".").lower()
        labels = name.split(".")
        if not name or not all(0 < len(label) < 64 for label in labels):
            return []  # not a DNS name: no data, as pyspf does
        key = (name, qtype)
        if key not in self.cache:
            try:
                records = self._lookup.records(name, qtype)
            except DnsTemporaryError as exc:
                raise spf.TempError(f"DNS {exc}") from exc
            self.cache[key] = [_spf_value(qtype, r) for r in records]
        result = list(self.cache[key])
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


@dataclass(frozen=True, slots=True)
class _SpfOutcome:
    public: SPFAuthenticationResult  # what the header shows
    identity: str  # the address SPF checked (postmaster@helo for a null sender), for DMARC


def _spf(
    resolver: dns.resolver.Resolver, timeout: float, ip: str, helo: str, mail_from: str, receiver: str
) -> _SpfOutcome:
    lookup = DnsLookup.with_budget(resolver, timeout)
    try:
        query = _SpfQuery(lookup, i=ip, s=mail_from, h=helo, receiver=receiver, timeout=timeout)
        word, _code, _explanation = query.check()
        identity = query.s
    except Exception:  # pyspf raises for addresses it cannot parse; unknown means temporary
        word, identity = "temperror", mail_from or f"postmaster@{helo}"
    public = SPFAuthenticationResult(
        result=str(word), smtp_mailfrom=mail_from or None, smtp_helo=helo or None
    )
    return _SpfOutcome(public=public, identity=identity)


# -- DKIM -------------------------------------------------------------------------------------


def _dkim(resolver: dns.resolver.Resolver, timeout: float, data: bytes) -> list[DKIMAuthenticationResult]:
    lookup = DnsLookup.with_budget(resolver, timeout)
    signatures = _signature_headers(data)[:MAX_SIGNATURES]
    return [_verify_one(data, index, value, lookup) for index, value in enumerate(signatures)]


def _signature_headers(data: bytes) -> list[bytes]:
    """DKIM-Signature values, top first (the order dkimpy's `verify(idx)` counts in)."""
    try:
        headers, _body = dkim.rfc822_parse(data)
    except Exception:  # unparsable message: no signature can be checked
        return []
    return [value for name, value in headers if name.lower() == b"dkim-signature"]


def _verify_one(data: bytes, index: int, header: bytes, lookup: DnsLookup) -> DKIMAuthenticationResult:
    found: list[bytes | None] = []

    def recording(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        found.append(lookup(name, timeout))
        return found[-1]

    reason: str | None = None
    try:
        verifier = dkim.DKIM(data, minkey=1024)
        word = "pass" if verifier.verify(index, dnsfunc=recording) else "fail"
    except DnsTemporaryError:
        word, reason = "temperror", "key lookup failed"
    except dkim.DKIMException as exc:  # fixed texts: the exception may quote sender data
        body = "body hash mismatch" in str(exc)
        word, reason = "fail", "body hash mismatch" if body else "signature not usable"
    except Exception:  # unknown: temporary, per house rule
        word, reason = "temperror", "verifier error"
    if word == "fail" and found and found[-1] is None:
        word, reason = "permerror", "no key for signature"
    try:
        fields = parse_tag_value(header)
    except Exception:
        fields = {}

    def tag(name: bytes) -> str | None:
        return fields.get(name, b"").decode("ascii", "replace") or None

    return DKIMAuthenticationResult(
        result=word,
        reason=reason,
        header_d=tag(b"d"),
        header_i=tag(b"i"),
        header_s=tag(b"s"),
        header_a=tag(b"a"),
    )


def _dkim_word(results: list[DKIMAuthenticationResult]) -> str:
    words = {str(r.result) for r in results}
    return next((w for w in _DKIM_ORDER if w in words), "none")


# -- DMARC ------------------------------------------------------------------------------------


def _dmarc(
    resolver: dns.resolver.Resolver,
    timeout: float,
    data: bytes,
    spf_outcome: _SpfOutcome,
    dkim_results: list[DKIMAuthenticationResult],
) -> AuthenticationResult:
    domains = _from_domains(data)
    if not domains:
        return DMARCAuthenticationResult(result="permerror", reason="no From domain")
    # authheaders rewrites smtp_mailfrom in place, and takes one DKIM result: give it a copy
    # carrying the SPF identity, and the passing signature aligned with the From domain.
    spf_for_dmarc = copy.copy(spf_outcome.public)
    spf_for_dmarc.smtp_mailfrom = spf_outcome.identity
    lookup = DnsLookup.with_budget(resolver, timeout)
    try:
        result = check_dmarc(
            data, spf_for_dmarc, _aligned(dkim_results, domains[0]), dnsfunc=lookup.text
        )
    except DnsTemporaryError:
        return DMARCAuthenticationResult(result="temperror", header_from=domains[0])
    except Exception:  # unknown: temporary, per house rule
        return DMARCAuthenticationResult(result="temperror", header_from=domains[0])
    if result.result == "none":
        return DMARCAuthenticationResult(result="none", header_from=domains[0])
    return result


def _from_domains(data: bytes) -> list[str]:
    try:
        headers, _body = dkim.rfc822_parse(data)
    except Exception:
        return []
    values = [v.replace(b"\r\n", b"").decode(errors="ignore").strip() for k, v in headers if k.lower() == b"from"]
    return [addr.rpartition("@")[2].lower() for _name, addr in getaddresses(values) if "@" in addr]


def _aligned(results: list[DKIMAuthenticationResult], from_domain: str) -> DKIMAuthenticationResult | None:
    passing = [r for r in results if r.result == "pass" and r.header_d]
    try:
        org = get_org_domain(from_domain)
        for result in passing:
            if get_org_domain(str(result.header_d).lower()) == org:
                return result
    except Exception:
        pass
    return passing[0] if passing else None
