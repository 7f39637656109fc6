"""ARC sealing (RFC 8617) of the copies we forward.

What it does: `seal` validates the ARC chain a message already carries (dkimpy `arc_verify`,
through the `dnsfunc` given), then returns the next ARC set to put on top of the message:
ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results with instance i=N+1 and
cv=none (no chain yet), pass or fail. The AAR carries our inbound verdicts (`results`, the
Authentication-Results value from `verdicts.check`) plus `arc=<chain status>`.

dkimpy's `arc_sign` takes those verdicts from an Authentication-Results field of the message
and silently returns nothing when none carries our authserv-id; so `seal` hands dkimpy a copy
of the message with exactly one such field (ours, built from `results`; any other claiming
our id is removed), and treats an empty answer as an error, never as "no headers".

Contract: pure apart from the DNS lookups of chain validation (through `dnsfunc`, blocking:
call from a worker thread). The message is not modified; only the three fields are returned,
in the order they must be prepended (ARC-Seal first), each ending with the message's line
ending. RSA only (dkimpy seals ARC with rsa-sha256 only).

Exposure: internal; the message and its existing chain come from the internet.

Failure: raises `ArcSealError`; `.temporary` is True when the chain could not be validated
for a DNS failure (try again later, or forward unsealed) and False for a message or key that
can never be sealed (no From field, more than 50 instances, bad key).
"""

from __future__ import annotations

from collections.abc import Callable

import dkim
import dns.exception
from authres import AuthenticationResultsHeader
from authres.arc import ARCAuthenticationResult
from authres.core import SyntaxError as AuthresSyntaxError

from maildetour.core.authres import strip_our_results
from maildetour.sign.dkim import line_separator

__all__ = ["ArcSealError", "DnsFunc", "chain_status", "seal"]

DnsFunc = Callable[..., bytes | str | None]  # dkimpy's dnsfunc: (name, timeout=...) -> TXT


class ArcSealError(Exception):
    """No ARC set could be made; `temporary` says whether trying later may help."""

    def __init__(self, message: str, *, temporary: bool = False) -> None:
        super().__init__(message)
        self.temporary = temporary


def chain_status(data: bytes, dnsfunc: DnsFunc) -> str:
    """The chain validation status of `data`: "none", "pass" or "fail" (RFC 8617 4.4)."""
    try:
        cv, _results, _reason = dkim.arc_verify(data, dnsfunc=dnsfunc)
    except dns.exception.DNSException as exc:
        raise ArcSealError(f"ARC chain not validated: {exc}", temporary=True) from exc
    except Exception:  # a chain dkimpy cannot even parse is a broken chain
        return "fail"
    status = (cv or b"none").decode("ascii").lower()
    return status if status in ("none", "pass", "fail") else "fail"


def seal(
    data: bytes,
    *,
    domain: str,
    selector: str,
    private_key_pem: bytes,
    authserv_id: str,
    results: str,
    now: float,
    dnsfunc: DnsFunc,
) -> bytes:
    """The next ARC set for `data` (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results).

    `results` is an Authentication-Results value whose authserv-id is `authserv_id`, e.g.
    "mx.example.com; spf=pass smtp.mailfrom=a@b.example; dkim=pass header.d=b.example".
    """
    cv = chain_status(data, dnsfunc)
    linesep = line_separator(data)
    ar_value = _results_with_arc(results, authserv_id, cv)
    work = b"Authentication-Results: " + ar_value.encode("utf-8") + linesep
    work += strip_our_results(data, authserv_id)
    try:
        fields = dkim.arc_sign(
            work,
            selector.encode("ascii"),
            domain.lower().encode("ascii"),
            private_key_pem,
            authserv_id.encode("utf-8"),
            timestamp=int(now),
            linesep=linesep,
        )
    except dkim.DKIMException as exc:
        raise ArcSealError(f"ARC sealing failed: {exc}") from exc
    except dns.exception.DNSException as exc:
        raise ArcSealError(f"ARC sealing failed: {exc}", temporary=True) from exc
    if len(fields) != 3:
        raise ArcSealError(f"dkimpy returned {len(fields)} ARC fields instead of 3 (cv={cv})")
    return b"".join(f if f.endswith(linesep) else f + linesep for f in fields)


def _results_with_arc(results: str, authserv_id: str, cv: str) -> str:
    """`results` with its arc= result (if any) replaced by the chain status we found."""
    try:
        header = AuthenticationResultsHeader.parse("Authentication-Results: " + results)
    except AuthresSyntaxError as exc:
        raise ValueError(f"not an Authentication-Results value: {results!r}") from exc
    if str(header.authserv_id).lower() != authserv_id.lower():
        raise ValueError(f"results are from {header.authserv_id!r}, not {authserv_id!r}")
    kept = [r for r in header.results if r.method != "arc"]
    rebuilt = AuthenticationResultsHeader(
        authserv_id=authserv_id, results=[*kept, ARCAuthenticationResult(result=cv)]
    )
    return str(rebuilt).partition(": ")[2]
