"""DMARC (RFC 7489) of a received message: policy discovery, identifier alignment, the result.

What it does: `read_authors` takes the domains of the From field (the RFC5322.From), in ASCII
form with their organizational domains. `discover` finds each one's policy: the TXT record at
`_dmarc.<From domain>`, else at `_dmarc.<organizational domain>` (RFC 7489 6.6.3; several
DMARC records at one name, or none, mean no policy). `evaluate` decides, for one author domain:
`pass` when SPF passed for an identity aligned with it or a DKIM signature of an aligned d=
passed (relaxed alignment: same organizational domain; strict, `aspf=s`/`adkim=s`: the same
name); else `temperror` when an aligned identifier could not be checked for now (its SPF or
DKIM result was temperror: slow DNS must not look like forgery); else `fail`. `none` without a
policy; `permerror` for a record that is not valid or a From domain that is no DNS name;
`temperror` when the policy itself could not be looked up. `combine` gives one verdict for a
From field with several domains: the worst (fail, temperror, permerror, none, pass), so a
forged author cannot hide behind a second one.

This replaces authheaders' DMARC code, which cuts domains at the first '-' (0.16.3), and keeps
our SPF and DKIM identities our own (no shared result objects).

Contract: `read_authors`, `parse_record`, `evaluate` and `combine` are pure (`read_authors`
loads the public suffix list on first use: call it in a worker thread); `discover` only queries
through the given `MessageDns`. Exposure: faces the internet (From and the records are the
sender's). Failure: never raises; outcomes are the result words above.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses

import dkim

from maildetour.verify.dkim_check import DkimVerdict
from maildetour.verify.lookups import MessageDns
from maildetour.verify.names import ascii_name, organizational_domain
from maildetour.verify.spf_check import SpfVerdict

__all__ = ["MAX_AUTHORS", "Author", "DmarcVerdict", "NoPolicy", "Policy", "PolicyError", "Record",
           "combine", "discover", "evaluate", "parse_record", "read_authors"]

# Distinct From domains evaluated. Real mail has one; a message claiming more is not honest,
# and each costs up to two DNS queries: more than this many is a `fail`.
MAX_AUTHORS = 10
_POLICIES = ("none", "quarantine", "reject")
_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|$)")
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_WORST_FIRST = ("fail", "temperror", "permerror", "none", "pass")


@dataclass(frozen=True, slots=True)
class Author:
    """One domain of the From field: ASCII form ("" if it is no DNS name) and organizational
    domain."""

    domain: str
    org: str


@dataclass(frozen=True, slots=True)
class Record:
    p: str  # none | quarantine | reject
    sp: str | None  # for subdomains; None: p applies
    adkim: str  # "r" relaxed | "s" strict
    aspf: str


@dataclass(frozen=True, slots=True)
class Policy:
    record: Record
    subdomain: bool  # found at the organizational domain for a From subdomain: sp applies


@dataclass(frozen=True, slots=True)
class NoPolicy:
    """No DMARC record applies (none published, or several at one name)."""


@dataclass(frozen=True, slots=True)
class PolicyError:
    result: str  # temperror | permerror
    reason: str


Discovered = Policy | NoPolicy | PolicyError


@dataclass(frozen=True, slots=True)
class DmarcVerdict:
    result: str  # pass, fail, none, temperror, permerror
    from_domain: str  # ASCII form; "" if there is none
    policy: str = ""  # the policy the domain asks for (p, or sp for a subdomain), if it has one
    comment: str | None = None  # "p=reject sp=none"
    reason: str | None = None


# -- the From field ---------------------------------------------------------------------------


def read_authors(data: bytes) -> list[Author] | DmarcVerdict:
    """The distinct domains of the From field(s), in order; a verdict when there is nothing
    to evaluate (no From domain: permerror; more than MAX_AUTHORS: fail)."""
    try:
        headers, _body = dkim.rfc822_parse(data)
    except Exception:
        return DmarcVerdict("permerror", "", reason="message not parsable")
    values = [re.sub(r"\r?\n(?=[ \t])", "", v.decode("utf-8", "replace")).strip()
              for k, v in headers if k.lower() == b"from"]
    domains: list[str] = []
    for _name, address in getaddresses(values):
        if "@" not in address:
            continue
        domain = ascii_name(address.rpartition("@")[2]) or ""
        if domain and not _HOSTNAME.fullmatch(domain):
            domain = ""  # a domain literal or junk: no DNS name to look up
        if domain not in domains:
            domains.append(domain)
    if not domains and any("@" in value for value in values):
        domains.append("")  # an address getaddresses would not read (older Pythons: a domain literal)
    if not domains:
        return DmarcVerdict("permerror", "", reason="no From domain")
    if len(domains) > MAX_AUTHORS:
        return DmarcVerdict("fail", domains[0], reason="too many From domains")
    return [Author(d, organizational_domain(d) if d else "") for d in domains]


# -- policy discovery -------------------------------------------------------------------------


async def discover(dns: MessageDns, author: Author) -> Discovered:
    if not author.domain:
        return PolicyError("permerror", "From domain is not a DNS name")
    found = await _records_at(dns, author.domain)
    if found is None and author.org != author.domain:
        found = await _records_at(dns, author.org)
        subdomain = True
    else:
        subdomain = False
    match found:
        case None | []:
            return NoPolicy()
        case str(temporary):
            return PolicyError("temperror", temporary)
        case [text]:
            record = parse_record(text)
            if record is None:
                return PolicyError("permerror", "invalid DMARC record")
            return Policy(record, subdomain)
        case _:  # several records at one name: DMARC is not applied (RFC 7489 6.6.3)
            return NoPolicy()


async def _records_at(dns: MessageDns, domain: str) -> list[str] | str | None:
    """The DMARC records at _dmarc.<domain>; None if there are none; a str if the lookup
    failed for now."""
    answer = await dns.fetch(f"_dmarc.{domain}", "TXT")
    if answer.temporary is not None:
        return answer.temporary
    texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer.records]  # type: ignore[attr-defined]
    records = [t for t in texts if _VERSION.match(t)]
    return records or None


def parse_record(text: str) -> Record | None:
    """A DMARC record's tags; None if it is not usable (no valid p= and no rua= to fall back
    on, RFC 7489 6.6.3). Unknown tags and invalid adkim/aspf/sp values are ignored."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            return None
        tags.setdefault(name.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    return Record(
        p=p,
        sp=sp if sp in _POLICIES else None,
        adkim="s" if tags.get("adkim", "").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "").lower() == "s" else "r",
    )


# -- the verdict ------------------------------------------------------------------------------


def evaluate(author: Author, found: Discovered, spf: SpfVerdict, dkim_results: list[DkimVerdict]) -> DmarcVerdict:
    match found:
        case NoPolicy():
            return DmarcVerdict("none", author.domain)
        case PolicyError(result, reason):
            return DmarcVerdict(result, author.domain, reason=reason)
        case Policy(record, subdomain):
            pass
    policy = record.sp if subdomain and record.sp else record.p
    comment = f"p={record.p}" + (f" sp={record.sp}" if record.sp else "")
    spf_aligned = _aligned(spf.domain, spf.org, author, strict=record.aspf == "s")
    dkim_aligned = [v for v in dkim_results if _aligned(v.domain, v.org, author, strict=record.adkim == "s")]
    if (spf.result == "pass" and spf_aligned) or any(v.result == "pass" for v in dkim_aligned):
        return DmarcVerdict("pass", author.domain, policy, comment)
    if (spf.result == "temperror" and spf_aligned) or any(v.result == "temperror" for v in dkim_aligned):
        return DmarcVerdict("temperror", author.domain, policy, comment,
                            reason="an aligned identifier could not be checked")
    return DmarcVerdict("fail", author.domain, policy, comment)


def combine(verdicts: list[DmarcVerdict]) -> DmarcVerdict:
    """One verdict for several From domains: the worst."""
    return min(verdicts, key=lambda v: _WORST_FIRST.index(v.result))


def _aligned(domain: str, org: str, author: Author, *, strict: bool) -> bool:
    if not domain or not author.domain:
        return False
    return domain == author.domain or (not strict and org == author.org)
