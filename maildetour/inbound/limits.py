"""Per-client and per-sender-domain limits of the SMTP server: the counters and the verdicts.

Pure: no I/O, no asyncio; the caller passes the time (a monotonic clock). Faces the internet
indirectly: the keys are client addresses and sender domains that clients choose, so every
table is bounded (the least recently seen key is forgotten first), and each operation is O(1)
(a dict lookup and a little arithmetic), so the per-command cost stays small under load.

What it decides (the replies come from `core.replies`):
  - `Clients.arrive`: a new connection — over the client's concurrent sessions or its
    connection rate gets 421 4.7.0;
  - `Clients.mail` / `Clients.rcpt`: per-minute rates of messages and recipients, per client
    and per sender domain (450 4.7.1), and the refused-recipients window (450 4.7.1);
  - `Clients.refused`: a refused recipient counts against its client's window.
A client in `unlimited_clients` (loopback by default) skips all of these; the limits within
one session (commands without progress, session time, refused recipients per session) are the
session's own business (`inbound.server`).
"""

from __future__ import annotations

import ipaddress

from maildetour.config.model import SmtpConfig
from maildetour.core import replies
from maildetour.core.replies import Reply

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_listed(host: str, networks: tuple[Network, ...]) -> bool:
    """Whether `host` (an address as the socket reports it) lies in one of `networks`."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


def default_limits(max_sessions: int) -> SmtpConfig:
    """The `[smtp]` defaults for a server of `max_sessions`: the session cap per client at most
    half of it, as `config.load` makes it when `max_sessions_per_client` is not set."""
    per_client = SmtpConfig.__dataclass_fields__["max_sessions_per_client"].default
    assert isinstance(per_client, int)
    return SmtpConfig(max_sessions=max_sessions, max_sessions_per_client=max(1, min(per_client, max_sessions // 2)))


class Buckets:
    """Token buckets by key: each holds up to `amount` tokens and regains `amount` per
    `period` seconds; `take` spends one. `amount` 0 means no limit. At most `max_keys` keys
    are kept (a dict in least-recently-used order); a forgotten key starts full again."""

    def __init__(self, amount: int, period: float, max_keys: int) -> None:
        self.amount, self.rate, self.max_keys = amount, amount / period, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.pop(key, None)  # popped and put back: the most recent at the end
        if entry is None:
            return float(self.amount)
        tokens, at = entry
        return min(float(self.amount), tokens + max(0.0, now - at) * self.rate)

    def _keep(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]

    def take(self, key: str, now: float) -> bool:
        """Spend a token; False (and nothing spent) when none is left."""
        if not self.amount:
            return True
        tokens = self._tokens(key, now)
        ok = tokens >= 1.0
        self._keep(key, tokens - 1.0 if ok else tokens, now)
        return ok

    def empty(self, key: str, now: float) -> bool:
        """Whether `take` would fail now; spends nothing."""
        if not self.amount:
            return False
        tokens = self._tokens(key, now)
        self._keep(key, tokens, now)
        return tokens < 1.0


class Clients:
    """The limits that count across sessions, shared by all sessions of one server."""

    def __init__(self, limits: SmtpConfig) -> None:
        self.limits = limits
        self.unlimited_networks = tuple(ipaddress.ip_network(n) for n in limits.unlimited_clients)
        keys = limits.max_tracked_clients
        self.sessions: dict[str, int] = {}  # open sessions by client (only those with one)
        self.connections = Buckets(limits.client_connections_per_minute, 60.0, keys)
        self.messages = Buckets(limits.client_messages_per_minute, 60.0, keys)
        self.recipients = Buckets(limits.client_recipients_per_minute, 60.0, keys)
        self.domain_messages = Buckets(limits.sender_domain_messages_per_minute, 60.0, keys)
        self.domain_recipients = Buckets(limits.sender_domain_recipients_per_minute, 60.0, keys)
        self.refusals = Buckets(limits.max_refused_per_client, limits.refused_window, keys)

    def unlimited(self, host: str) -> bool:
        return is_listed(host, self.unlimited_networks)

    def arrive(self, key: str, now: float) -> Reply | None:
        """A new connection from `key`: None (counted; call `leave` when it ends) or a 421."""
        if self.sessions.get(key, 0) >= self.limits.max_sessions_per_client:
            return replies.CLIENT_SESSIONS
        if not self.connections.take(key, now):
            return replies.CLIENT_CONNECTION_RATE
        self.sessions[key] = self.sessions.get(key, 0) + 1
        return None

    def leave(self, key: str) -> None:
        left = self.sessions.get(key, 0) - 1
        if left > 0:
            self.sessions[key] = left
        else:
            self.sessions.pop(key, None)

    def mail(self, key: str, sender_domain: str, now: float) -> Reply | None:
        """MAIL FROM from `key` with a sender in `sender_domain` ("" for <>): None or a 450."""
        if not self.messages.take(key, now):
            return replies.CLIENT_MESSAGE_RATE
        if not self.domain_messages.take(sender_domain, now):
            return replies.DOMAIN_MESSAGE_RATE
        return None

    def rcpt(self, key: str, sender_domain: str, now: float) -> Reply | None:
        """RCPT TO from `key`: None or a 450. A client over its refused-recipients window gets
        450 for every recipient, valid or not, so the answers tell it nothing."""
        if self.refusals.empty(key, now):
            return replies.CLIENT_REFUSED
        if not self.recipients.take(key, now):
            return replies.CLIENT_RECIPIENT_RATE
        if not self.domain_recipients.take(sender_domain, now):
            return replies.DOMAIN_RECIPIENT_RATE
        return None

    def refused(self, key: str, now: float) -> None:
        """A recipient from `key` was refused (5xx)."""
        self.refusals.take(key, now)


def sender_domain(address: str) -> str:
    """The domain a MAIL FROM address counts under: lowercased; "" for the null sender."""
    return address.rpartition("@")[2].lower() if "@" in address else ""
