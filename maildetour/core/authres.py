"""Reading our own Authentication-Results header back from a stored message.

Pure. Inbound checks put one `Authentication-Results: <authserv-id>; ...` on top of each
message (after removing any that claimed our id). Delivery reads it back for ARC sealing and
for a destination's `skip_when`. Only a header with our authserv-id is trusted.

Even our own header carries sender-chosen text (smtp.mailfrom, smtp.helo), so a result is
only read where RFC 8601 puts one: the leading `method=result` of each `;`-separated
resinfo, outside quoted strings and comments. `MAIL FROM:<dmarc=pass@x>` says nothing.
"""

from __future__ import annotations

import re

from maildetour.core.received import header_block

_FIELD = re.compile(rb"^authentication-results:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.I | re.M)
_METHODS = ("spf", "dkim", "dmarc", "arc")
# The leading "method[/version] = result" of a resinfo (RFC 8601 section 2.2).
_LEADING = re.compile(r"\s*([a-z0-9-]+)(?:\s*/\s*[0-9]+)?\s*=\s*([a-z]+)", re.I)


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
    for resinfo in _resinfos(value or "")[1:]:  # the first part is the authserv-id
        found = _LEADING.match(resinfo)
        if found is None:
            continue
        method, result = found.group(1).lower(), found.group(2).lower()
        if method not in _METHODS:
            continue
        if method not in words or (method == "dkim" and result == "pass"):
            words[method] = result
    return words


def _resinfos(value: str) -> list[str]:
    """`value` split at the semicolons that separate resinfos, with comments removed and
    quoted strings kept whole (a `;` or `=` inside them separates nothing)."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0  # comment nesting
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
            if depth == 0:
                current.append(char)
        elif char == "\\" and (quoted or depth):
            escaped = True
            if depth == 0:
                current.append(char)
        elif quoted:
            current.append(char)
            quoted = char != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                current.append(" ")
        elif char == "(":
            depth = 1
        elif char == '"':
            quoted = True
            current.append(char)
        elif char == ";":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def skip_reason(skip_when: tuple[str, ...], words: dict[str, str]) -> str | None:
    """The first `skip_when` condition ("dmarc-fail", ...) the verdicts meet, if any."""
    for condition in skip_when:
        method, _, result = condition.partition("-")
        if words.get(method) == result:
            return condition
    return None
