"""How many bytes of DATA the SMTP server takes in at once: sessions wait for room before 354.

Internal (the sizes come from clients, the limit from `[smtp] max_bytes_receiving`). A session
about to answer DATA reserves its message's declared size (SIZE=, RFC 1870) or, without one,
the largest a message may be; when the reservations in force leave no room it waits (up to a
minute) for other sessions to finish, and then gets 452 4.3.1 (try again later). One
reservation always goes, whatever its size, so a message as large as the limit still gets
through. Memory while receiving is then about three times the reserved bytes (aiosmtpd's
lines, their join, the stored message with our headers): a flood of large messages is slowed
down instead of taking the machine's memory (issue 10: 100 concurrent 25 MB messages held
7.5 GB before this). Never raises.
"""

from __future__ import annotations

import asyncio


class DataBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # may change on reload; reservations in force stay
        self.used = 0
        self._changed = asyncio.Event()

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    async def reserve(self, size: int, wait: float) -> bool:
        """Reserve `size` bytes, waiting up to `wait` seconds for room; False when none came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            self._changed.clear()  # before the look: a release after it wakes the wait below
            if self._fits(size):
                self.used += size
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return False

    def release(self, size: int) -> None:
        self.used -= size
        self._changed.set()
