"""The DNS doctor behind `maildetour dns records` and `maildetour dns check` (issue 12).

What it does: `facts(config, addresses)` gathers what the records follow from (domains, host
name, SRS domain, the public halves of the configured DKIM keys); `diagnose(facts, resolver)`
looks up every record `dnsrecords` expects — MX, SPF (evaluated with pyspf for each server
address: the SRS domain's and the HELO name's must pass), DKIM (the published key must be
ours), DMARC, the host name's addresses and the PTR of each (forward-confirmed reverse DNS) —
and returns one `dnsrecords.Finding` each.

Contract: blocking (a command, not the server); every lookup goes through the resolver it is
given (the config's `delivery.dns_servers`, or the system's), never pyspf's own. When no
address is given, the server's addresses are those of `server.hostname`.
Exposure: operator-facing; the names looked up are our own. Failure: DNS trouble becomes an
"error" finding, never an exception; an unreadable key file becomes a finding too.
"""

from __future__ import annotations

import time

import dns.exception
import dns.rdata
import dns.resolver
import spf

from maildetour.config.model import Config
from maildetour.dnsrecords import (
    Answer,
    DkimKey,
    Facts,
    Finding,
    check_dkim,
    check_dmarc,
    check_forward,
    check_mx,
    check_ptr,
    check_spf,
    reverse_name,
)
from maildetour.sign.dkim_keys import DkimKeyError, public_key
from maildetour.verify.dnsfunc import DnsLookup, DnsTemporaryError

__all__ = ["diagnose", "facts"]

LOOKUP_TIMEOUT = 5.0  # seconds for each query: a healthy one takes milliseconds
# Seconds for all the lookups of one check (about 20, and pyspf's): a dead resolver makes the
# rest "error" at once instead of a wait of 5 s each.
LOOKUP_BUDGET = 20.0


def facts(config: Config, addresses: tuple[str, ...] = ()) -> Facts:
    """The facts of `config`; `addresses` are the server's (from --ip), if given."""
    keys: list[DkimKey] = []
    signing = config.signing
    if signing is not None:
        wanted = [(signing.selector, signing.dkim_key, "rsa")]
        if signing.ed25519_selector and signing.ed25519_key:
            wanted.append((signing.ed25519_selector, signing.ed25519_key, "ed25519"))
        for selector, path, algorithm in wanted:
            try:
                keys.append(DkimKey(selector, signing.domain, public_key(path, algorithm)))
            except (OSError, DkimKeyError) as exc:
                reason = f"{path}: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
                keys.append(DkimKey(selector, signing.domain, None,
                                    f"cannot read our key ({reason}); `maildetour dkim keygen` makes it"))
    domains = tuple(sorted(config.routing_table().domains))
    srs = config.srs.domain if config.srs is not None else None
    return Facts(config.server.hostname, domains, srs, tuple(keys), addresses)


def diagnose(found: Facts, resolver: dns.resolver.Resolver) -> list[Finding]:
    """Look everything up (see the module header); one finding per expected record."""
    lookup = DnsLookup(resolver, timeout=LOOKUP_TIMEOUT, deadline=time.monotonic() + LOOKUP_BUDGET)
    host = found.hostname
    forward = [_answer(lookup, host, "A"), _answer(lookup, host, "AAAA")]
    findings = [check_forward(host, found.addresses, forward)]
    addresses = found.addresses or tuple(value for answer in forward for value in answer.values)
    findings += [check_ptr(a, host, _answer(lookup, reverse_name(a), "PTR")) for a in addresses]
    if host not in found.domains:
        findings.append(_spf(lookup, host, "HELO", addresses, host, must_pass=True))
    findings += [check_mx(domain, host, _answer(lookup, domain, "MX")) for domain in found.domains]
    for domain in found.domains:
        srs = domain == found.srs_domain
        findings.append(_spf(lookup, domain, "SRS domain" if srs else "", addresses, host, must_pass=srs))
    findings += [check_dkim(key, _answer(lookup, key.name, "TXT")) for key in found.dkim]
    findings += [check_dmarc(domain, _answer(lookup, f"_dmarc.{domain}", "TXT")) for domain in found.domains]
    return findings


def _spf(lookup: DnsLookup, name: str, role: str, addresses: tuple[str, ...], helo: str, *,
         must_pass: bool) -> Finding:
    answer = _answer(lookup, name, "TXT")
    verdicts: dict[str, str] = {}
    if must_pass and not answer.error:
        verdicts = {ip: _evaluate(lookup, ip, f"postmaster@{name}", helo) for ip in addresses}
    return check_spf(name, role, answer, verdicts, must_pass)


def _answer(lookup: DnsLookup, name: str, rdtype: str) -> Answer:
    try:
        records = lookup.records(name, rdtype)
    except dns.exception.DNSException as exc:  # DnsTemporaryError, or a resolver's odd failure
        return Answer(error=str(exc) or type(exc).__name__)
    return Answer(tuple(_text(rdtype, record) for record in records))


def _text(rdtype: str, record: dns.rdata.Rdata) -> str:
    match rdtype:
        case "TXT":
            return b"".join(record.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]
        case "MX":
            return f"{record.preference} {record.exchange.to_text(omit_final_dot=True)}"  # type: ignore[attr-defined]
        case "PTR":
            return str(record.target.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
        case _:
            return str(record.address)  # type: ignore[attr-defined]


def _evaluate(lookup: DnsLookup, ip: str, sender: str, helo: str) -> str:
    """pyspf's verdict (pass, fail, softfail, neutral, none, permerror, temperror) for mail
    from `sender` sent by `ip`, with every lookup through `lookup`."""
    try:
        result, _code, _explanation = _SpfQuery(lookup, i=ip, s=sender, h=helo).check()
    except Exception:  # pyspf raises for input it cannot parse; the finding says "temperror"
        return "temperror"
    return str(result)


class _SpfQuery(spf.query):  # type: ignore[misc]
    """pyspf's query with its DNS asked through our resolver instead of its module one."""

    def __init__(self, lookup: DnsLookup, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._lookup = lookup

    def dns(self, name: str, qtype: str, cnames: object = None, ignore_void: bool = False) -> list[object]:
        """Same contract as pyspf's `query.dns`: a list of values, void lookups counted."""
        try:
            records = self._lookup.records(str(name), qtype)
        except DnsTemporaryError as exc:
            raise spf.TempError(f"DNS {exc}") from None
        result: list[object] = []
        for record in records:
            match qtype:
                case "A" | "AAAA":
                    result.append(record.address)  # type: ignore[attr-defined]
                case "MX":
                    result.append((record.preference,  # type: ignore[attr-defined]
                                   record.exchange.to_text(omit_final_dot=True)))  # type: ignore[attr-defined]
                case "PTR":
                    result.append(record.target.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
                case _:  # TXT, SPF
                    result.append(list(record.strings))  # type: ignore[attr-defined]
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result
