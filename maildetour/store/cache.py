"""Message bytes kept in memory between acceptance and delivery, bounded by bytes and age.

Internal, not thread-safe (used on the event loop only). A message just accepted is usually
read again within milliseconds by its first attempts (one per next hop); keeping its bytes
saves a spool read each. An entry goes when it is dropped (its message finished), when it was
not used for `max_age` seconds, or when newer entries need the room (least recently used
first); a message bigger than the whole budget is never kept. A miss only costs a spool read.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable


class BytesCache:
    def __init__(self, budget: int, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget, self.max_age, self.clock = budget, max_age, clock
        self.size = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def put(self, key: str, data: bytes) -> None:
        self.drop(key)
        if len(data) > self.budget:
            return
        self._entries[key] = (self.clock(), data)
        self.size += len(data)
        self._trim()

    def get(self, key: str) -> bytes | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._entries[key] = (self.clock(), entry[1])  # most recently used last
        self._trim()
        return entry[1]

    def drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size -= len(entry[1])

    def __len__(self) -> int:
        return len(self._entries)

    def _trim(self) -> None:
        oldest = self.clock() - self.max_age
        while self._entries:
            key, (used, data) = next(iter(self._entries.items()))
            if self.size <= self.budget and used >= oldest:
                break
            del self._entries[key]
            self.size -= len(data)
