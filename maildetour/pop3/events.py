"""Values the POP3 state machine exchanges with its wrapper: effects out, login results in.

Pure frozen values, no behaviour. Exposure: internal. Nothing here fails.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pop3Message:
    """One message of the snapshot taken at login: its UIDL and size in octets (CRLF)."""

    uid: str
    size: int


# --- effects (protocol -> wrapper) ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Open snapshot message `index` (0-based); if it is gone send `MESSAGE_GONE`, else send
    `first_line`, then the stuffed message (`body_lines` None: all; n: header + n lines)."""

    index: int
    first_line: bytes
    body_lines: int | None


@dataclass(frozen=True, slots=True)
class CheckLogin:
    """Verify credentials, lock and list the mailbox; answer with `login_result`."""

    username: str
    password: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """Drop any unread input, start TLS, then call `tls_started` (or close on failure)."""


@dataclass(frozen=True, slots=True)
class Expunge:
    """Remove these snapshot messages (0-based indexes) and answer with `expunged`."""

    indexes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection; nothing more will be produced."""


Effect = Send | SendMessage | CheckLogin | StartTls | Expunge | Close


# --- login results (wrapper -> protocol) ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class LoginAccepted:
    messages: tuple[Pop3Message, ...]


@dataclass(frozen=True, slots=True)
class LoginRefused:
    """Wrong user name or password, or throttled: the client is not told which."""


@dataclass(frozen=True, slots=True)
class LoginInUse:
    """Right password, but another session holds the mailbox."""


@dataclass(frozen=True, slots=True)
class LoginUnavailable:
    """Right password, but the mailbox could not be read."""


LoginResult = LoginAccepted | LoginRefused | LoginInUse | LoginUnavailable
