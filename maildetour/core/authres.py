"""Our own Authentication-Results header: removing forged ones, reading ours back.

Pure. Inbound checks put one `Authentication-Results: <authserv-id>; ...` on top of each
message, after `strip_our_results` removed any that claimed our id (RFC 8601 section 5: no
sender may forge our verdicts); ARC sealing does the same on its work copy. Delivery reads
ours back for the ARC seal and for a destination's `skip_when`. Only a header with our
authserv-id is trusted.

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


# -- removing forged results (RFC 8601 section 5) --------------------------------------------

_BLANK_LINE = re.compile(rb"(?m)^\r?\n")
_AR_NAME = re.compile(rb"^authentication-results[ \t]*:", re.IGNORECASE)
_COMMENT = re.compile(rb"^\s*(\([^()]*\)\s*)*")


def strip_our_results(data: bytes, authserv_id: str) -> bytes:
    """`data` without the Authentication-Results fields whose authserv-id is ours (any case);
    every other byte, including line endings and the body, is kept exactly."""
    ours = authserv_id.strip().lower().encode("utf-8", "replace")  # never raises (found by fuzzing)
    blank = _BLANK_LINE.search(data)  # the end of the header section: the rest is kept as it is
    head, rest = (data[:blank.start()], data[blank.start():]) if blank else (data, b"")
    if b"authentication-results" not in head.lower():
        return data  # the common case: nothing to look at, and no copy of a big message
    lines = re.split(rb"(?<=\n)", head)
    kept: list[bytes] = []
    dropping = False
    for position, line in enumerate(lines):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):  # continuation of the field before
            if not dropping:
                kept.append(line)
            continue
        dropping = bool(_AR_NAME.match(line)) and _claims(line, lines[position + 1 :], ours)
        if not dropping:
            kept.append(line)
    return b"".join(kept) + rest


def _claims(first: bytes, following: list[bytes], ours: bytes) -> bool:
    """Whether the Authentication-Results field starting at `first` names `ours`."""
    value = first.partition(b":")[2]
    for line in following:  # unfold: the authserv-id may sit on a continuation line
        if line[:1] not in (b" ", b"\t"):
            break
        value += line
    value = _COMMENT.sub(b"", value.replace(b"\r", b" ").replace(b"\n", b" "), count=1)
    token = re.split(rb"[\s;(]", value.strip(), maxsplit=1)[0]
    return token.lower() == ours
