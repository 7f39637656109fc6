"""Failed-login throttle: per client address and per mailbox name, over a sliding window.

Every attempt is counted *before* its password is checked (`reserve`), and the count is given
back only when the password was right (`release`): a burst of parallel logins cannot all slip
past the limit while their scrypt runs are still in progress (issue 10 #3).

Pure: the caller passes the current time (monotonic seconds); no clock, no I/O. Mutable state
owned by one POP3 service (not global). Exposure: fed with what internet clients send (their
address, the user name they typed), so memory is bounded: at most `max_tracked` keys, the
least recently failed forgotten first. The mailbox key is whatever name was tried, existing or
not, so a throttled answer never tells whether a mailbox exists. Fails never.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from maildetour.core.client_key import client_key


@dataclass(frozen=True, slots=True)
class Reservation:
    """One counted login attempt, to give back with `release` if the password was right."""

    keys: tuple[str, str]
    time: float


class LoginThrottle:
    __slots__ = ("_per_client", "_per_mailbox", "_window", "_max_tracked", "_failures")

    def __init__(self, *, per_client: int, per_mailbox: int, window: float,
                 max_tracked: int) -> None:
        self._per_client = per_client
        self._per_mailbox = per_mailbox
        self._window = window
        self._max_tracked = max_tracked
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def set_limits(self, *, per_client: int, per_mailbox: int, window: float, max_tracked: int) -> None:
        """New limits (a reload); the failures counted so far stay."""
        self._per_client, self._per_mailbox, self._window = per_client, per_mailbox, window
        self._max_tracked = max_tracked

    def blocked(self, client: str, mailbox: str, now: float) -> bool:
        """True when either the client or the mailbox has used up its failures in the window."""
        client_part, mailbox_part = self._keys(client, mailbox)
        return (self._count(client_part, now) >= self._per_client
                or self._count(mailbox_part, now) >= self._per_mailbox)

    def reserve(self, client: str, mailbox: str, now: float) -> Reservation | None:
        """Count an attempt as failed before its password is checked; None (and nothing
        counted) when the client or the mailbox is already blocked."""
        if self.blocked(client, mailbox, now):
            return None
        self.record_failure(client, mailbox, now)
        return Reservation(self._keys(client, mailbox), now)

    def release(self, reservation: Reservation) -> None:
        """The attempt succeeded: it is not a failure after all."""
        for key in reservation.keys:
            times = self._failures.get(key)
            if times is None:
                continue  # forgotten meanwhile (window passed, or memory bound)
            try:
                times.remove(reservation.time)
            except ValueError:
                continue
            if not times:
                del self._failures[key]

    def record_failure(self, client: str, mailbox: str, now: float) -> None:
        for key in self._keys(client, mailbox):
            times = self._failures.pop(key, None) or deque()
            times.append(now)
            while len(times) > max(self._per_client, self._per_mailbox):
                times.popleft()
            self._failures[key] = times
        while len(self._failures) > self._max_tracked:
            self._failures.popitem(last=False)

    @staticmethod
    def _keys(client: str, mailbox: str) -> tuple[str, str]:
        return "c:" + client_key(client), "m:" + mailbox.lower()

    def _count(self, key: str, now: float) -> int:
        times = self._failures.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)
