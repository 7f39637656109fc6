"""The one redaction point: private addresses out of anything a sender can see.

Pure. Every reply text, DSN and header that is built from data which might contain a forward
target or hidden address passes through `Redactor.scrub`. Matching ignores case. What is
replaced is the whole address and its bare local part when that is distinctive (4+ characters),
because remote refusals sometimes quote only the mailbox name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PLACEHOLDER = "[private]"


@dataclass(frozen=True, slots=True)
class Redactor:
    private: frozenset[str]
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        words: set[str] = set()
        for address in self.private:
            words.add(address.lower())
            local = address.split("@", 1)[0].lower()
            if len(local) >= 4:
                words.add(local)
        ordered = sorted(words, key=len, reverse=True)  # whole address before its local part
        pattern = re.compile("|".join(re.escape(w) for w in ordered), re.I) if ordered else None
        object.__setattr__(self, "_pattern", pattern)

    def scrub(self, text: str) -> str:
        return self._pattern.sub(PLACEHOLDER, text) if self._pattern else text

    def leaks(self, text: str) -> bool:
        """True if `text` contains a private address (used by tests and safety checks)."""
        lowered = text.lower()
        return any(address.lower() in lowered for address in self.private)
