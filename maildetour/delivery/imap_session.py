"""IMAP sessions for the APPEND agent: connect, TLS, log in; foreign exceptions -> outcomes.

What it does: `connect(account, context)` opens a connection to an `[imap."NAME"]` account,
with TLS (implicit, or STARTTLS with no fallback to plain text) verified against the system's
CAs or the account's `ca_file` (`tls_context`), greets, and logs in with a freshly read secret
(`imap_auth`): IMAP LOGIN, or SASL XOAUTH2 (with SASL-IR when offered, else after the "+").
It returns a `Connection` or the outcome that stands for why not. aioimaplib has no STARTTLS:
`_starttls` upgrades the transport itself. `_Protocol` repairs three things in aioimaplib (see
its docstring) and notes whether the server asked for an APPEND's message.
Contract: never raises for remote or network trouble; every command of a `Connection` runs
within the account's timeout, and one that times out or is cancelled closes the connection.
Exposure: talks to remote (untrusted) IMAP servers. Their reply text is cleaned and capped
(`reply_text`) and goes only into private reasons. Reasons are our words plus the place
(user@host:port), never a password or token (aioimaplib's debug log is scrubbed of the exact
argument we send) and never an exception's text; public words are ours and fixed.
Failure: foreign exceptions become outcomes in one function, `outcome_for_error`: all are
temporary (the policy retries the step until its deadline), never Unreachable:
  refused, unreachable, no such host, connect timeout   451 4.4.1
  timeout waiting for a reply, connection lost          451 4.4.2
  TLS: certificate, name mismatch (said so), handshake,  451 4.7.5
       STARTTLS not offered or refused, bad ca_file
  login refused (LOGIN/AUTHENTICATE NO), password or    451 4.7.0
       token command failed
  anything else                                         451 4.0.0
"""

from __future__ import annotations

import asyncio
import base64
import errno
import re
import socket
import ssl
from typing import Any, Awaitable, TypeVar

from aioimaplib.aioimaplib import AUTH, CRLF, NONAUTH, Command, IMAP4ClientProtocol, quoted

from maildetour.config.model import ImapAccount
from maildetour.core.classify import MAX_REPLY_CHARS
from maildetour.core.outcome import Outcome, TemporaryFailure
from maildetour.delivery.imap_auth import CredentialError, read_secret, xoauth2_response

T = TypeVar("T")

# LOGOUT at close() is a courtesy; do not let a slow server hold up shutdown.
LOGOUT_TIMEOUT = 2.0

PUBLIC_CONNECT = "the mailbox server could not be reached"
PUBLIC_LOST = "the connection to the mailbox server was lost"
PUBLIC_TLS = "no secure connection to the mailbox server"
PUBLIC_LOGIN = "the mailbox server refused the login"
PUBLIC_ERROR = "a temporary problem with the mailbox server"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Capabilities restated at login: in the tagged OK's response code, or an untagged line.
_CAPABILITY = re.compile(rb"^(?:\[CAPABILITY ([^\]]*)\]|CAPABILITY (.*)$)", re.IGNORECASE)
# OpenSSL's X509 verification errors we can say in words.
_CERT_PROBLEMS = {
    62: "its certificate is not valid for this host name (name mismatch)",
    64: "its certificate is not valid for this IP address (name mismatch)",
    10: "its certificate has expired",
    9: "its certificate is not valid yet",
    18: "its certificate is self-signed (not trusted; set ca_file?)",
    19: "its certificate chain is not trusted (self-signed CA; set ca_file?)",
    20: "its certificate is not signed by a trusted CA (set ca_file?)",
    21: "its certificate is not signed by a trusted CA (set ca_file?)",
}


class ConnectionLost(Exception):
    """The server closed the connection (or it broke) before the reply we waited for."""


class TlsRefused(Exception):
    """STARTTLS was not offered or not accepted; we never go on in plain text."""


class _Protocol(IMAP4ClientProtocol):  # type: ignore[misc]  # aioimaplib has no type hints
    """aioimaplib's protocol with three repairs and a note: a lost connection completes `lost`
    (aioimaplib would leave a pending command waiting for its timeout); a bad greeting closes
    the connection instead of failing in a task nobody awaits; an AUTHENTICATE continuation is
    answered (our response when the server has no SASL-IR, else the empty line that lets the
    server finish a failed XOAUTH2 with its tagged NO); and `message_asked` notes the "+" that
    asks for an APPEND's message (before it, a dead connection cannot have stored anything)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.lost: asyncio.Future[None] = loop.create_future()
        self.sasl_answer: str | None = None
        self.message_asked = False  # the server's "+" for the current APPEND's message came

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    async def welcome(self, command: bytes) -> None:
        try:
            await super().welcome(command)
        except Exception:  # "* BYE" greeting, or not IMAP4rev1: nothing to talk to
            self.transport.close()

    def _continuation(self, line: bytes) -> None:
        command = self.pending_sync_command
        if command is not None and command.name == "AUTHENTICATE":
            answer, self.sasl_answer = self.sasl_answer or "", None
            if not answer:
                command.append_to_resp(line)
            self.transport.write(answer.encode("ascii") + CRLF)
            return
        if command is not None and command.name == "APPEND":
            self.message_asked = True  # aioimaplib sends the message now
        super()._continuation(line)

    async def run(self, operation: Awaitable[T]) -> T:
        """Await `operation`, or raise ConnectionLost as soon as the connection is gone."""
        task = asyncio.ensure_future(operation)
        waiting: set[asyncio.Future[Any]] = {task, self.lost}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        raise ConnectionLost()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Connection:
    """One open IMAP connection to an account (a resource, not a value)."""

    __slots__ = ("place", "protocol", "timeout", "timer")

    def __init__(self, protocol: _Protocol, place: str, timeout: float) -> None:
        self.protocol = protocol
        self.place = place
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        transport = self.protocol.transport
        return not self.protocol.lost.done() and transport is not None and not transport.is_closing()

    @property
    def message_unsent(self) -> bool:
        """The server never asked for the last APPEND's message (no "+" came)."""
        return not self.protocol.message_asked

    async def call(self, operation: Awaitable[T]) -> T:
        """One command within the timeout; a timeout or cancellation closes the connection
        (its state is unknown then), and so does a lost connection."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self.protocol.run(operation)
        except BaseException:
            self.close()
            raise

    def append_limit(self) -> int | None:
        """APPENDLIMIT=n (RFC 7889) from the capabilities, if the server states one."""
        for capability in self.protocol.capabilities:
            name, _, value = str(capability).partition("=")
            if name.upper() == "APPENDLIMIT" and value.isdigit():
                return int(value)
        return None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self.cancel_timer()
        self.protocol.close()

    async def logout(self) -> None:
        """LOGOUT (a courtesy, briefly) and close."""
        self.cancel_timer()
        try:
            if self.alive:
                async with asyncio.timeout(LOGOUT_TIMEOUT):
                    await self.protocol.run(self.protocol.logout())
        except Exception:
            pass
        finally:
            self.protocol.close()


def where(account: ImapAccount) -> str:
    host = f"[{account.host}]" if ":" in account.host else account.host
    return f"{account.user}@{host}:{account.port}"


def tls_context(account: ImapAccount) -> ssl.SSLContext | TemporaryFailure:
    """Verified TLS: the account's CA bundle, or the system's; host names checked. A ca_file
    that cannot be read or parsed is a temporary failure (the operator can fix it meanwhile)."""
    try:
        cafile = str(account.ca_file) if account.ca_file is not None else None
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        return TemporaryFailure(f"{where(account)}: TLS failed: ca_file {account.ca_file} cannot "
                                f"be used ({type(exc).__name__})", 451, "4.7.5", PUBLIC_TLS)


def mailbox_name(folder: str) -> str:
    """`folder` as a quoted IMAP mailbox name: modified UTF-7 for anything but printable
    ASCII (RFC 3501 5.1.3), so no folder name can inject CR/LF or change the command."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in folder:
        if " " <= char <= "~":
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return str(quoted("".join(out)))


async def connect(account: ImapAccount, context: ssl.SSLContext) -> Connection | Outcome:
    """A new connection, TLS up and logged in, or the outcome that stands for why not."""
    place = where(account)
    loop = asyncio.get_running_loop()
    protocol = _Protocol(loop)
    phase = "connect"
    try:
        async with asyncio.timeout(account.timeout):
            implicit = account.tls == "implicit"
            await loop.create_connection(
                lambda: protocol, account.host, account.port,
                ssl=context if implicit else None,
                server_hostname=account.host if implicit else None)
            await protocol.run(protocol.wait(f"{AUTH}|{NONAUTH}"))  # the greeting
        if not implicit:
            phase = "starttls"
            async with asyncio.timeout(account.timeout):
                await _starttls(protocol, context, account.host)
    except Exception as exc:
        protocol.close()
        return outcome_for_error(exc, place, phase)
    except BaseException:
        protocol.close()
        raise
    connection = Connection(protocol, place, account.timeout)
    refused = await _login(connection, account)
    if refused is not None:
        connection.close()
        return refused
    return connection


async def _starttls(protocol: _Protocol, context: ssl.SSLContext, host: str) -> None:
    """Upgrade a plain connection to TLS (RFC 3501 6.2.1); aioimaplib has no STARTTLS.

    The plain-text capabilities must offer STARTTLS and the server must answer OK; only then
    the handshake, verifying the certificate against `host`, on the same transport and
    protocol. What the server said in plain text is not trusted: the capabilities are asked
    again over TLS (a PREAUTH greeting in plain text is refused outright). Any failure raises:
    we never go on in plain text."""
    if protocol.state != NONAUTH:
        raise TlsRefused("PREAUTH greeting in plain text")
    if "STARTTLS" not in protocol.capabilities:
        raise TlsRefused("STARTTLS not offered")
    tag = protocol.new_tag()
    response = await protocol.run(protocol.execute(Command("STARTTLS", tag, loop=protocol.loop)))
    if response.result != "OK" or protocol.incomplete_line:  # refused, or data after the OK
        raise TlsRefused("STARTTLS refused")
    loop = asyncio.get_running_loop()
    protocol.transport = await loop.start_tls(protocol.transport, protocol, context,
                                              server_hostname=host)
    protocol.capabilities = set()
    await protocol.run(protocol.capability())


async def _login(connection: Connection, account: ImapAccount) -> Outcome | None:
    """LOGIN or AUTHENTICATE XOAUTH2 with a freshly read secret; None when logged in."""
    protocol, place = connection.protocol, connection.place
    if protocol.state == AUTH:  # PREAUTH greeting (over TLS): already logged in
        return None
    secret = await read_secret(account)
    if isinstance(secret, CredentialError):
        return TemporaryFailure(f"{place}: {secret.reason}", 451, "4.7.0", PUBLIC_LOGIN)
    tag = protocol.new_tag()
    try:
        if account.auth == "xoauth2":
            argument = xoauth2_response(account.user, secret.value)
            if "SASL-IR" in protocol.capabilities:
                command = Command("AUTHENTICATE", tag, "XOAUTH2", argument, loop=protocol.loop)
            else:  # the response goes after the server's "+" (`_Protocol._continuation`)
                protocol.sasl_answer = argument
                command = Command("AUTHENTICATE", tag, "XOAUTH2", loop=protocol.loop)
        else:
            argument = quoted(secret.value)
            command = Command("LOGIN", tag, quoted(account.user), argument, loop=protocol.loop)
    except ValueError:  # aioimaplib refuses CR, LF and NUL in arguments
        return TemporaryFailure(f"{place}: the user name or password cannot be sent (control "
                                "characters)", 451, "4.7.0", PUBLIC_LOGIN)
    try:
        response = await connection.call(protocol.execute(command, scrub=argument))
    except Exception as exc:
        return outcome_for_error(exc, place, "login")
    if response.result != "OK":
        return TemporaryFailure(
            f"{place}: login refused ({account.auth}: wrong user or password, expired token, "
            f"or account locked): {response.result} {reply_text(response.lines[-1:])}",
            451, "4.7.0", PUBLIC_LOGIN)
    protocol.state = AUTH
    for line in response.lines:  # servers restate their capabilities after login: keep those
        if isinstance(line, bytes) and (found := _CAPABILITY.match(line)):
            listed = found.group(1) or found.group(2)
            protocol.capabilities = set(listed.decode("ascii", "replace").split())
    return None


def outcome_for_error(exc: BaseException, place: str, phase: str) -> TemporaryFailure:
    """The outcome standing for `exc`, raised during `phase` (connect, starttls, login,
    append, noop, examine) with `place`. Our words only, never the exception's text."""
    connecting = phase in ("connect", "starttls")
    match exc:
        case ssl.SSLCertVerificationError():
            problem = _CERT_PROBLEMS.get(exc.verify_code,
                                         f"its certificate did not verify (X509 error {exc.verify_code})")
            return TemporaryFailure(f"{place}: TLS failed: {problem}", 451, "4.7.5", PUBLIC_TLS)
        case ssl.SSLError() | ssl.CertificateError():
            return TemporaryFailure(f"{place}: TLS failed ({type(exc).__name__}) during {phase}",
                                    451, "4.7.5", PUBLIC_TLS)
        case TlsRefused():
            return TemporaryFailure(f"{place}: TLS failed: {exc.args[0] if exc.args else 'STARTTLS'}"
                                    " (we never continue in plain text)", 451, "4.7.5", PUBLIC_TLS)
        case TimeoutError() if connecting:
            return TemporaryFailure(f"{place}: timed out connecting ({phase})", 451, "4.4.1",
                                    PUBLIC_CONNECT)
        case TimeoutError():
            return TemporaryFailure(f"{place}: timed out waiting for the reply ({phase})", 451,
                                    "4.4.2", PUBLIC_LOST)
        case ConnectionLost() if connecting:
            return TemporaryFailure(f"{place}: the server closed the connection before we could "
                                    f"log in ({phase})", 451, "4.4.1", PUBLIC_CONNECT)
        case ConnectionLost():
            return TemporaryFailure(f"{place}: the server closed the connection ({phase})", 451,
                                    "4.4.2", PUBLIC_LOST)
        case socket.gaierror():
            return TemporaryFailure(f"{place}: host name not found", 451, "4.4.1", PUBLIC_CONNECT)
        case ConnectionRefusedError():
            return TemporaryFailure(f"{place}: connection refused", 451, "4.4.1", PUBLIC_CONNECT)
        case OSError() if connecting:
            return TemporaryFailure(f"{place}: cannot connect ({_errno_name(exc)})", 451, "4.4.1",
                                    PUBLIC_CONNECT)
        case OSError():
            return TemporaryFailure(f"{place}: network error ({_errno_name(exc)}) during {phase}",
                                    451, "4.4.2", PUBLIC_LOST)
        case _:
            return TemporaryFailure(f"{place}: unexpected error ({type(exc).__name__}) during "
                                    f"{phase}", 451, "4.0.0", PUBLIC_ERROR)


def reply_text(lines: list[bytes]) -> str:
    """A server's reply text for a private reason: decoded, control characters out, capped."""
    joined = " ".join(line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
                      for line in lines)
    cleaned = _CONTROL.sub("", joined).strip()
    return cleaned if len(cleaned) <= MAX_REPLY_CHARS else cleaned[: MAX_REPLY_CHARS - 3] + "..."


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
