"""POP3 server protocol (RFC 1939, 2449 CAPA, 2595 STLS, 5034 AUTH PLAIN) as a state machine.

Sans-I/O: bytes from the client go in (`receive`), effects come out (`Send`, `SendMessage`,
`CheckLogin`, `StartTls`, `Expunge`, `Close`); the wrapper performs them and reports back
(`login_result`, `tls_started`, `expunged`). All state transitions are in `_COMMANDS`, one table.
While an effect is outstanding, later pipelined lines wait in the buffer. Pure: no sockets, no
files, no clock. Exposure: faces the internet — every byte a client sends lands here first.
Failure: bad input never raises; it gets `-ERR`, and too much of it gets `-ERR` and `Close`
(too many commands, bad commands, failed logins, or commands before a login that are not a
login attempt). The wrapper's deadlines (login time, session time) end a session by `expired`.
Deletions are only marked here; `Expunge` is emitted only by QUIT in TRANSACTION (UPDATE state).
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable

from maildetour.config.model import Pop3Settings
from maildetour.pop3.events import (
    CheckLogin, Close, Effect, Expunge, LoginAccepted, LoginInUse, LoginRefused, LoginResult,
    LoginUnavailable, Pop3Message, Send, SendMessage, StartTls)


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    AUTH_RESPONSE = "waiting for the AUTH PLAIN response line"
    LOGIN_PENDING = "waiting for the login check"
    TLS_PENDING = "waiting for the TLS handshake"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


_WAITING = frozenset({State.LOGIN_PENDING, State.TLS_PENDING, State.UPDATE, State.CLOSED})

# Named replies: every text a client can see, in one place.
MESSAGE_GONE = b"-ERR message was removed by another client\r\n"
TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
_OK = b"+OK\r\n"
_ERR_UNKNOWN = b"-ERR unknown command\r\n"
_ERR_STATE = b"-ERR command not valid in this state\r\n"
_ERR_SYNTAX = b"-ERR syntax error\r\n"
_ERR_NO_MESSAGE = b"-ERR no such message\r\n"
_ERR_TOO_LONG = b"-ERR line too long\r\n"
_ERR_TOO_MANY = b"-ERR too many commands, closing\r\n"
_ERR_TOO_BAD = b"-ERR too many bad commands, closing\r\n"
_ERR_AUTH = b"-ERR [AUTH] authentication failed\r\n"
_ERR_AUTH_CLOSE = b"-ERR [AUTH] authentication failed, closing\r\n"
_ERR_INSECURE = b"-ERR [AUTH] plaintext authentication disallowed on non-secure connections\r\n"
_ERR_IN_USE = b"-ERR [IN-USE] mailbox is locked by another session\r\n"
_ERR_UNAVAILABLE = b"-ERR [SYS/TEMP] mailbox temporarily unavailable\r\n"
_ERR_USER_FIRST = b"-ERR USER first\r\n"
_ERR_NO_TLS = b"-ERR STLS not available\r\n"
_ERR_AUTH_CANCELLED = b"-ERR authentication cancelled\r\n"
_ERR_MECHANISM = b"-ERR unsupported authentication mechanism\r\n"
_ERR_EXPUNGE = b"-ERR [SYS/TEMP] some deleted messages were not removed\r\n"
_ERR_NO_LOGIN = b"-ERR too many commands without a login, closing\r\n"
_ERR_LOGIN_TIME = b"-ERR [AUTH] no login in time, closing\r\n"
_ERR_SESSION_TIME = b"-ERR [SYS/TEMP] session time limit reached, closing\r\n"

_MAX_NUMBER_DIGITS = 18


class Pop3Session:
    """One client connection's protocol state. Create it, send `greeting()`, feed it bytes."""

    def __init__(self, *, settings: Pop3Settings, hostname: str, tls_active: bool,
                 tls_available: bool, peer_is_loopback: bool) -> None:
        self._settings = settings
        self._hostname = hostname
        self._tls_active = tls_active
        self._tls_available = tls_available and not tls_active
        self._peer_is_loopback = peer_is_loopback
        self.state = State.AUTHORIZATION
        self._buffer = b""
        self._discarding = False  # inside an overlong line: drop bytes until LF
        self._user: str | None = None  # set by USER, consumed by the next command
        self._user_for_pass: str | None = None  # what USER set, while PASS runs
        self._messages: tuple[Pop3Message, ...] = ()
        self._deleted: set[int] = set()
        self._commands = 0
        self._bad_commands = 0
        self._login_failures = 0
        self._commands_before_login = 0  # that were not a login attempt (CAPA, USER, STLS...)

    # --- inputs ------------------------------------------------------------------------------
    def greeting(self) -> Send:
        return Send(f"+OK {self._hostname} POP3 server ready\r\n".encode("ascii", "replace"))

    def receive(self, data: bytes) -> list[Effect]:
        if self.state is State.CLOSED:
            return []
        self._buffer += data
        return self._run()

    def login_result(self, result: LoginResult) -> list[Effect]:
        """The wrapper's answer to `CheckLogin`; goes on with any pipelined lines."""
        if self.state is not State.LOGIN_PENDING:
            raise RuntimeError("login_result without a pending login")
        return self._login_outcome(result) + self._run()

    def _login_outcome(self, result: LoginResult) -> list[Effect]:
        self.state = State.AUTHORIZATION
        match result:
            case LoginAccepted(messages):
                self._messages = messages
                self.state = State.TRANSACTION
                total = sum(m.size for m in messages)
                effects: list[Effect] = [Send(
                    f"+OK logged in, {len(messages)} messages ({total} octets)\r\n".encode())]
            case LoginInUse():
                effects = [Send(_ERR_IN_USE)]
            case LoginUnavailable():
                effects = [Send(_ERR_UNAVAILABLE)]
            case LoginRefused():
                self._login_failures += 1
                if self._login_failures >= self._settings.max_login_failures:
                    return self._close(_ERR_AUTH_CLOSE)
                effects = [Send(_ERR_AUTH)]
        return effects

    def tls_started(self) -> list[Effect]:
        if self.state is not State.TLS_PENDING:
            raise RuntimeError("tls_started without STLS")
        self._tls_active = True
        self._tls_available = False
        self._buffer = b""
        self.state = State.AUTHORIZATION
        return []

    def timed_out(self) -> list[Effect]:
        """The client was idle too long (RFC 1939 autologout): close without UPDATE."""
        if self.state is State.CLOSED:
            return []
        return self._close(b"-ERR autologout: idle for too long\r\n")

    def expired(self) -> list[Effect]:
        """The wrapper's deadline passed: `login_timeout` before a login, `max_session_time`
        after. Close without UPDATE (nothing is deleted)."""
        if self.state is State.CLOSED:
            return []
        if self.state in (State.TRANSACTION, State.UPDATE):
            return self._close(_ERR_SESSION_TIME)
        return self._close(_ERR_LOGIN_TIME)

    def expunged(self, failures: int) -> list[Effect]:
        if self.state is not State.UPDATE:
            raise RuntimeError("expunged outside the UPDATE state")
        if failures:
            return self._close(_ERR_EXPUNGE)
        left = len(self._messages) - len(self._deleted)
        return self._close(f"+OK bye, {left} messages left\r\n".encode())

    # --- line handling -----------------------------------------------------------------------
    def _run(self) -> list[Effect]:
        effects: list[Effect] = []
        limit = self._settings.max_line_length
        while self.state not in _WAITING:
            end = self._buffer.find(b"\n")
            if self._discarding:
                if end < 0:
                    self._buffer = b""
                    break
                self._buffer = self._buffer[end + 1:]
                self._discarding = False
                continue
            if end < 0:
                if len(self._buffer) > limit:
                    self._buffer = b""
                    self._discarding = True
                    effects += self._bad(_ERR_TOO_LONG)
                    continue
                break
            line, self._buffer = self._buffer[:end + 1], self._buffer[end + 1:]
            if len(line) > limit:
                effects += self._bad(_ERR_TOO_LONG)
                continue
            effects += self._line(line.rstrip(b"\r\n"))
        return effects

    def _line(self, line: bytes) -> list[Effect]:
        self._commands += 1
        if self._commands > self._settings.max_commands:
            return self._close(_ERR_TOO_MANY)
        if self.state is State.AUTH_RESPONSE:
            return self._auth_response(line)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad(_ERR_UNKNOWN)
        keyword, _, argument = text.partition(" ")
        keyword = keyword.upper()
        if keyword != "PASS":  # a password may begin or end with spaces
            argument = argument.strip(" ")
        self._user_for_pass, self._user = self._user, None
        handler = _COMMANDS.get(self.state, {}).get(keyword)
        if handler is None:
            known = any(keyword in table for table in _COMMANDS.values())
            return self._bad(_ERR_STATE if known else _ERR_UNKNOWN)
        if self.state is State.AUTHORIZATION and not _is_login_attempt(keyword, argument):
            self._commands_before_login += 1
            if self._commands_before_login > self._settings.max_commands_before_login:
                return self._close(_ERR_NO_LOGIN)
        return handler(self, argument)

    def _bad(self, reply: bytes) -> list[Effect]:
        self._bad_commands += 1
        if self._bad_commands > self._settings.max_bad_commands:
            return self._close(_ERR_TOO_BAD)
        return [Send(reply)]

    def _close(self, reply: bytes) -> list[Effect]:
        self.state = State.CLOSED
        self._buffer = b""
        return [Send(reply), Close()]

    # --- AUTHORIZATION -----------------------------------------------------------------------
    def _login_allowed(self) -> bool:
        return (self._tls_active or self._peer_is_loopback
                or self._settings.allow_insecure_login)

    def _capa(self, argument: str) -> list[Effect]:
        lines = ["+OK capability list follows", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE",
                 "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self._login_allowed():
                lines += ["USER", "SASL PLAIN"]
            if self._tls_available:
                lines.append("STLS")
        lines += ["IMPLEMENTATION maildetour", "."]
        return [Send("".join(line + "\r\n" for line in lines).encode("ascii"))]

    def _user_command(self, argument: str) -> list[Effect]:
        if not self._login_allowed():
            return self._bad(_ERR_INSECURE)
        if not argument:
            return self._bad(_ERR_SYNTAX)
        self._user = argument
        return [Send(_OK)]

    def _pass(self, argument: str) -> list[Effect]:
        user = self._user_for_pass
        if not self._login_allowed():
            return self._bad(_ERR_INSECURE)
        if user is None:
            return self._bad(_ERR_USER_FIRST)
        self.state = State.LOGIN_PENDING
        return [CheckLogin(user, argument)]

    def _auth(self, argument: str) -> list[Effect]:
        mechanism, _, initial = argument.partition(" ")
        if not mechanism:
            # Pre-RFC 5034 clients send a bare AUTH to list mechanisms.
            return [Send(b"+OK\r\nPLAIN\r\n.\r\n")]
        if not self._login_allowed():
            return self._bad(_ERR_INSECURE)
        if mechanism.upper() != "PLAIN":
            return self._bad(_ERR_MECHANISM)
        if not initial:
            self.state = State.AUTH_RESPONSE
            return [Send(b"+ \r\n")]
        return self._auth_response(initial.encode("utf-8"))

    def _auth_response(self, response: bytes) -> list[Effect]:
        self.state = State.AUTHORIZATION
        if response.strip() == b"*":
            return self._bad(_ERR_AUTH_CANCELLED)
        try:
            decoded = base64.b64decode(response.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return self._refuse_login()
        parts = decoded.split("\0")
        if len(parts) != 3 or not parts[1]:
            return self._refuse_login()
        authzid, authcid, password = parts
        if authzid and authzid.lower() != authcid.lower():
            return self._refuse_login()
        self.state = State.LOGIN_PENDING
        return [CheckLogin(authcid, password)]

    def _refuse_login(self) -> list[Effect]:
        return self._login_outcome(LoginRefused())

    def _stls(self, argument: str) -> list[Effect]:
        if not self._tls_available:
            return self._bad(_ERR_NO_TLS)
        self.state = State.TLS_PENDING
        self._buffer = b""  # anything pipelined after STLS is an injection attempt
        return [Send(b"+OK begin TLS negotiation\r\n"), StartTls()]

    def _quit_authorization(self, argument: str) -> list[Effect]:
        return self._close(f"+OK {self._hostname} POP3 server signing off\r\n".encode())

    # --- TRANSACTION -------------------------------------------------------------------------
    def _stat(self, argument: str) -> list[Effect]:
        live = self._live()
        total = sum(self._messages[i].size for i in live)
        return [Send(f"+OK {len(live)} {total}\r\n".encode())]

    def _list(self, argument: str) -> list[Effect]:
        return self._scan(argument, lambda m: str(m.size), "scan listing follows")

    def _uidl(self, argument: str) -> list[Effect]:
        return self._scan(argument, lambda m: m.uid, "unique-id listing follows")

    def _scan(self, argument: str, field: Callable[[Pop3Message], str], title: str) -> list[Effect]:
        if argument:
            index = self._message_index(argument)
            if index is None:
                return self._bad(_ERR_NO_MESSAGE)
            return [Send(f"+OK {index + 1} {field(self._messages[index])}\r\n".encode())]
        lines = [f"+OK {title}\r\n"]
        lines += [f"{i + 1} {field(self._messages[i])}\r\n" for i in self._live()]
        lines.append(".\r\n")
        return [Send("".join(lines).encode())]

    def _retr(self, argument: str) -> list[Effect]:
        index = self._message_index(argument)
        if index is None:
            return self._bad(_ERR_NO_MESSAGE)
        first = f"+OK {self._messages[index].size} octets\r\n".encode()
        return [SendMessage(index, first, None)]

    def _top(self, argument: str) -> list[Effect]:
        number, _, count = argument.partition(" ")
        index = self._message_index(number)
        lines = _parse_number(count)
        if lines is None:
            return self._bad(_ERR_SYNTAX)
        if index is None:
            return self._bad(_ERR_NO_MESSAGE)
        return [SendMessage(index, b"+OK top of message follows\r\n", lines)]

    def _dele(self, argument: str) -> list[Effect]:
        index = self._message_index(argument)
        if index is None:
            return self._bad(_ERR_NO_MESSAGE)
        self._deleted.add(index)
        return [Send(f"+OK message {index + 1} deleted\r\n".encode())]

    def _noop(self, argument: str) -> list[Effect]:
        return [Send(_OK)]

    def _rset(self, argument: str) -> list[Effect]:
        self._deleted.clear()
        return self._stat("")

    def _quit_transaction(self, argument: str) -> list[Effect]:
        self.state = State.UPDATE
        return [Expunge(tuple(sorted(self._deleted)))]

    def _live(self) -> list[int]:
        return [i for i in range(len(self._messages)) if i not in self._deleted]

    def _message_index(self, argument: str) -> int | None:
        number = _parse_number(argument)
        if number is None or not 1 <= number <= len(self._messages):
            return None
        if number - 1 in self._deleted:
            return None
        return number - 1


def _is_login_attempt(keyword: str, argument: str) -> bool:
    """PASS, or AUTH naming a mechanism: limited by `max_login_failures` and the throttle."""
    return keyword == "PASS" or (keyword == "AUTH" and bool(argument))


def _parse_number(text: str) -> int | None:
    if not text or len(text) > _MAX_NUMBER_DIGITS or not text.isascii() or not text.isdigit():
        return None
    return int(text)


_Handler = Callable[[Pop3Session, str], list[Effect]]

# The one state table: which commands each state accepts, and who handles them.
_COMMANDS: dict[State, dict[str, _Handler]] = {
    State.AUTHORIZATION: {
        "CAPA": Pop3Session._capa,
        "USER": Pop3Session._user_command,
        "PASS": Pop3Session._pass,
        "AUTH": Pop3Session._auth,
        "STLS": Pop3Session._stls,
        "QUIT": Pop3Session._quit_authorization,
    },
    State.TRANSACTION: {
        "CAPA": Pop3Session._capa,
        "STAT": Pop3Session._stat,
        "LIST": Pop3Session._list,
        "UIDL": Pop3Session._uidl,
        "RETR": Pop3Session._retr,
        "TOP": Pop3Session._top,
        "DELE": Pop3Session._dele,
        "NOOP": Pop3Session._noop,
        "RSET": Pop3Session._rset,
        "QUIT": Pop3Session._quit_transaction,
    },
}
