"""DKIM (RFC 6376) of a received message with dkimpy, its key records fetched asynchronously.

What it does: `check_dkim` reads the DKIM-Signature fields (top first, at most
`MAX_SIGNATURES`), fetches the key record of each (`<s>._domainkey.<d>` TXT) on the event
loop, all at once, then verifies every signature in the checks' worker pool with dkimpy, its
`dnsfunc` answering from what was fetched (a name dkimpy asks for that was not fetched is
fetched and the verification repeated). One result per signature: pass, fail (with a fixed
reason: "body hash mismatch" or "signature not usable"), permerror ("no key for signature"),
temperror ("key lookup failed").

Contract: dkimpy never queries DNS itself. The message bytes are not changed. Exposure: faces
the internet (signatures and keys are the sender's). Failure: never raises; an unexpected
library exception is `temperror` (unknown means temporary).
"""

from __future__ import annotations

from dataclasses import dataclass

import dkim
from dkim.util import parse_tag_value

from maildetour.verify.dnsfunc import DnsTemporaryError, pick_txt
from maildetour.verify.lookups import MessageDns, NeedLookup, View
from maildetour.verify.names import ascii_name, organizational_domain

__all__ = ["MAX_SIGNATURES", "DkimVerdict", "check_dkim"]

MAX_SIGNATURES = 5  # DKIM signatures verified per message; more cost DNS and CPU for nothing
# Verifications of the signatures with the keys fetched so far: the first finds the names
# from the tags; a second is only needed if dkimpy asks for another name.
_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class DkimVerdict:
    result: str  # pass, fail, permerror, temperror
    reason: str | None
    d: str | None  # the tags as written in the signature (for the header)
    i: str | None
    s: str | None
    a: str | None
    domain: str  # d= in ASCII form ("" if unusable), for DMARC alignment
    org: str  # its organizational domain


async def check_dkim(dns: MessageDns, data: bytes) -> list[DkimVerdict]:
    signatures = await dns.run(_signature_headers, data)
    if not signatures:
        return []
    await dns.fetch_all([(name, "TXT") for name in map(_key_name, signatures) if name])
    verdicts: list[DkimVerdict] = []
    for _ in range(_ROUNDS):
        view = dns.view()
        verdicts = await dns.run(_verify_all, view, data, signatures)
        if not view.missing or dns.left() <= 0:
            break
        await dns.fetch_all(view.missing)
    return verdicts


def _signature_headers(data: bytes) -> list[bytes]:
    """DKIM-Signature values, top first (the order dkimpy's `verify(idx)` counts in)."""
    try:
        headers, _body = dkim.rfc822_parse(data)
    except Exception:  # unparsable message: no signature can be checked
        return []
    return [value for name, value in headers if name.lower() == b"dkim-signature"][:MAX_SIGNATURES]


def _tags(header: bytes) -> dict[bytes, bytes]:
    try:
        return dict(parse_tag_value(header))
    except Exception:
        return {}


def _key_name(header: bytes) -> str | None:
    tags = _tags(header)
    selector, domain = tags.get(b"s"), tags.get(b"d")
    if not selector or not domain:
        return None
    return (selector + b"._domainkey." + domain).decode("utf-8", "replace")


def _verify_all(view: View, data: bytes, signatures: list[bytes]) -> list[DkimVerdict]:
    """Blocking (CPU only): every signature verified with the keys in `view`."""
    return [_verify_one(view, data, index, header) for index, header in enumerate(signatures)]


def _verify_one(view: View, data: bytes, index: int, header: bytes) -> DkimVerdict:
    found: list[bytes | None] = []

    def dnsfunc(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        answer = view.get(name, "TXT")  # NeedLookup: fetched, then verified again
        if answer.temporary is not None:
            raise DnsTemporaryError(answer.temporary)
        texts = [b"".join(r.strings) for r in answer.records]  # type: ignore[attr-defined]
        found.append(pick_txt(texts))
        return found[-1]

    reason: str | None = None
    try:
        verifier = dkim.DKIM(data, minkey=1024)
        word = "pass" if verifier.verify(index, dnsfunc=dnsfunc) else "fail"
    except NeedLookup:
        word, reason = "temperror", "key lookup failed"
    except DnsTemporaryError:
        word, reason = "temperror", "key lookup failed"
    except dkim.DKIMException as exc:  # fixed texts: the exception may quote sender data
        body = "body hash mismatch" in str(exc)
        word, reason = "fail", "body hash mismatch" if body else "signature not usable"
    except Exception:  # unknown: temporary, per house rule
        word, reason = "temperror", "verifier error"
    if word == "fail" and found and found[-1] is None:
        word, reason = "permerror", "no key for signature"
    tags = _tags(header)

    def tag(name: bytes) -> str | None:
        return tags.get(name, b"").decode("utf-8", "replace") or None

    domain = ascii_name(tags.get(b"d", b"")) or ""
    return DkimVerdict(word, reason, tag(b"d"), tag(b"i"), tag(b"s"), tag(b"a"), domain,
                       organizational_domain(domain) if domain else "")

