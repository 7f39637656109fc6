"""Domain names as the checks compare and look them up: ASCII (A-label) form, and the
organizational domain of RFC 7489 section 3.2.

What it does: `ascii_name` turns a name as found in a message (a From domain, a DKIM d=, an
SPF identity, a name a library asks for; text or bytes, U-labels or A-labels, any case, with
or without the final dot) into the lowercase ASCII form DNS and comparisons use: ASCII labels
are kept as they are (underscore labels such as `_dmarc` and `_domainkey` included), other
labels are IDNA-encoded (UTS #46, non-transitional, with the `idna` package; Python's IDNA
2003 codec when it is missing). `organizational_domain` applies the public suffix list
(publicsuffix2's bundled copy, the one authheaders uses): the public suffix plus one label,
the default rule `*` for a top-level domain the list does not know (`spf-pass.test` ->
`spf-pass.test`); a public suffix itself is its own organizational domain.

Contract: pure apart from loading the bundled list once, on first use (about 0.1 s of CPU:
call it from a worker thread, as the checks do). No network. Exposure: fed with names chosen by
senders; lengths are checked (a label 1-63 octets, a name at most 253). Failure: a name that
cannot be put in ASCII form gives None, never an exception.
"""

from __future__ import annotations

import functools
import importlib
import threading
from types import ModuleType

from publicsuffix2 import PublicSuffixList


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - the idna package is nearly always there
        return None


_idna = _optional("idna")

__all__ = ["ascii_name", "organizational_domain"]

_MAX_NAME = 253  # octets of a name in text form without the final dot (RFC 1035 2.3.4)
_MAX_LABEL = 63
_psl_lock = threading.Lock()


def ascii_name(name: str | bytes) -> str | None:
    """`name` in lowercase A-label form without the final dot, or None if it has none."""
    if isinstance(name, bytes):
        try:
            name = name.decode("utf-8")
        except UnicodeDecodeError:
            return None
    name = name.strip().rstrip(".")
    if not name:
        return None
    labels = []
    for label in name.split("."):
        encoded = _ascii_label(label)
        if encoded is None or not 0 < len(encoded) <= _MAX_LABEL:
            return None
        labels.append(encoded)
    text = ".".join(labels)
    return text if len(text) <= _MAX_NAME else None


def _ascii_label(label: str) -> str | None:
    if label.isascii():
        return label.lower() if label.isprintable() and " " not in label else None
    try:
        if _idna is not None:
            return str(_idna.encode(label, uts46=True).decode("ascii"))
        return label.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):  # idna.IDNAError is a UnicodeError
        return None


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2 for an `ascii_name` result: the public suffix plus one label."""
    labels = domain.split(".")
    suffix = _public_suffixes().get_tld(domain, wildcard=True)
    size = len(suffix.split(".")) if suffix else 1
    return ".".join(labels[-(size + 1):]) if len(labels) > size else domain


@functools.cache
def _loaded() -> PublicSuffixList:
    return PublicSuffixList(idna=True)


def _public_suffixes() -> PublicSuffixList:
    with _psl_lock:  # one load, even when two worker threads ask first at the same time
        return _loaded()
