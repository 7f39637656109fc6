"""Reading our own Authentication-Results header back from a stored message.

Pure. Inbound checks put one `Authentication-Results: <authserv-id>; ...` on top of each
message (after removing any that claimed our id). Delivery reads it back for ARC sealing and
for a destination's `skip_when`. Only a header with our authserv-id is trusted.
"""

from __future__ import annotations

import re

from maildetour.core.received import header_block

_FIELD = re.compile(rb"^authentication-results:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.I | re.M)
_RESULT = re.compile(r"\b(spf|dkim|dmarc|arc)=([a-z]+)", re.I)


def find_results(data: bytes, authserv_id: str) -> str | None:
    """The unfolded value of the first Authentication-Results header with our authserv-id."""
    for match in _FIELD.finditer(header_block(data)):
        value = re.sub(r"\r?\n[ \t]+", " ", match.group(1).decode("utf-8", "replace")).strip()
        if value.split(";", 1)[0].strip().lower() == authserv_id.lower():
            return value
    return None


def verdict_words(value: str | None) -> dict[str, str]:
    """{"spf": "pass", "dkim": "fail", "dmarc": "fail"}; the first result of each method wins,
    except DKIM, where any pass wins (several signatures)."""
    words: dict[str, str] = {}
    for method, result in _RESULT.findall(value or ""):
        method, result = method.lower(), result.lower()
        if method not in words or (method == "dkim" and result == "pass"):
            words[method] = result
    return words


def skip_reason(skip_when: tuple[str, ...], words: dict[str, str]) -> str | None:
    """The first `skip_when` condition ("dmarc-fail", ...) the verdicts meet, if any."""
    for condition in skip_when:
        method, _, result = condition.partition("-")
        if words.get(method) == result:
            return condition
    return None
