"""MTA-STS (RFC 8461): reading a domain's TXT record and policy file, matching MX names.

Pure: text in, values out. The fetching and caching is `delivery.tls_policy`'s. Exposure: faces
the internet (a domain's DNS and web server choose the text), so everything is bounded: the
policy file is read up to `MAX_POLICY` bytes, at most `MAX_MX` mx lines count, max_age is capped
at RFC 8461's 31,557,600 seconds. A malformed record or policy is an error value, never an
exception (RFC 8461 3.2: a policy that cannot be parsed is no policy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_POLICY = 64 * 1024  # RFC 8461 3.3: senders may limit the policy to 64 KB
MAX_MX = 64  # more mx patterns than this is not a policy we need to honour in full
MAX_AGE = 31_557_600  # RFC 8461 3.2: max_age at most one year
MODES = ("enforce", "testing", "none")

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_PATTERN = re.compile(r"^(\*\.)?(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")


@dataclass(frozen=True, slots=True)
class StsPolicy:
    mode: str  # one of MODES
    mx: tuple[str, ...]  # patterns, lowercased: "mx.example.com" or "*.example.com"
    max_age: int  # seconds the policy may be cached


@dataclass(frozen=True, slots=True)
class StsError:
    reason: str


def txt_id(texts: list[str]) -> str | StsError:
    """The policy id of a domain's `_mta-sts` TXT records: exactly one must start "v=STSv1"."""
    ours = [t for t in texts if t.startswith("v=STSv1")]
    if len(ours) != 1:
        return StsError("no single v=STSv1 TXT record" if not ours else "several v=STSv1 TXT records")
    fields = [field.strip() for field in ours[0].split(";")]
    ids = [field[3:] for field in fields if field.startswith("id=")]
    if fields[0] != "v=STSv1" or len(ids) != 1 or not _ID.fullmatch(ids[0]):
        return StsError("malformed v=STSv1 TXT record")
    return ids[0]


def parse_policy(text: str) -> StsPolicy | StsError:
    """RFC 8461 3.2: "key: value" lines (CRLF or LF); version, mode and max_age required; mx
    lines required unless the mode is none."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text[:MAX_POLICY].splitlines():
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "mx":
            if len(mx) < MAX_MX:
                mx.append(value.lower().rstrip("."))
        elif key not in fields:
            fields[key] = value
    if fields.get("version") != "STSv1":
        return StsError("policy version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        return StsError(f"policy mode {mode!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        return StsError("policy max_age is not a number")
    if mode != "none" and not mx:
        return StsError("policy names no mx")
    if not all(_PATTERN.match(pattern) for pattern in mx):
        return StsError("policy has a malformed mx pattern")
    return StsPolicy(mode, tuple(mx), min(int(age), MAX_AGE))


def mx_matches(patterns: tuple[str, ...], host: str) -> bool:
    """RFC 8461 4.1: an exact name, or "*.d" matching exactly one label on the left of d."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            label, dot, rest = host.partition(".")
            if dot and label and rest == pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False
