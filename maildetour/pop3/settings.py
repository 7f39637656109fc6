"""Every limit and policy switch of the POP3 server, with its default and the reason for it.

Pure values. Exposure: internal (`app.py` builds one from the `[pop3]` config table; keys it
does not set keep these defaults). Nothing here fails; `__post_init__` rejects nonsense values
with ValueError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Pop3Settings:
    # RFC 2449 caps a command at 255 octets, but an AUTH PLAIN response carries a base64 user
    # name and password; 1024 fits any sane pair and still stops junk early.
    max_line_length: int = 1024
    # Enough to RETR and DELE 40,000 messages in one session; stops a client that loops.
    max_commands: int = 100_000
    # Unknown, malformed or wrong-state commands before we hang up: clients that speak POP3 make
    # a few mistakes at most (probing CAPA extensions); junk senders make many.
    max_bad_commands: int = 20
    # Failed logins in one session before we hang up (the per-address throttle is separate).
    max_login_failures: int = 3
    # RFC 1939 asks for an autologout timer of at least 10 minutes.
    idle_timeout: float = 600.0
    # Concurrent sessions over all listeners; more get "-ERR [SYS/TEMP]" and are closed.
    max_connections: int = 100
    # Clear-text USER/PASS and AUTH PLAIN are refused before TLS (RFC 2595), except from
    # loopback; set True only behind a trusted network (e.g. a TLS-terminating proxy).
    allow_insecure_login: bool = False
    # Pause before answering a failed login: slows guessing within one session.
    failed_login_delay: float = 1.0
    # Throttle: failed logins from one client address (IPv6: its /64) within the window...
    max_failures_per_client: int = 10
    # ...and against one mailbox name from anywhere (higher: it also locks out the owner).
    max_failures_per_mailbox: int = 30
    # Sliding window for both throttles, in seconds.
    failure_window: float = 900.0
    # Addresses/mailboxes remembered by the throttle; the least recently failed are forgotten.
    max_tracked_failures: int = 10_000
    # Time allowed for a TLS handshake (implicit or after STLS).
    tls_handshake_timeout: float = 30.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                continue
            if value <= 0 and field.name != "failed_login_delay" or value < 0:
                raise ValueError(f"pop3 setting {field.name} must be positive, got {value!r}")
        if self.max_line_length < 64:
            raise ValueError("pop3 setting max_line_length must be at least 64")
