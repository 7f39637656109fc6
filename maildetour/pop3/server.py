"""asyncio wrapper around the POP3 state machine: listeners, TLS, login checks, Maildir I/O.

Runs `protocol.Pop3Session` per connection and performs its effects: writes replies with flow
control, verifies passwords (argon2id or scrypt, in its own bounded thread pool), keeps the per-mailbox
lock and the login throttle, lists and reads Maildirs (in another pool of its own, chunk by
chunk), starts TLS after STLS (dropping any input pipelined behind it), removes messages only
when the session says so (QUIT in TRANSACTION).

Exposure: faces the internet. Limits beyond the protocol's own (issue 10 #3, #8): every login
attempt is counted by the throttle before its hash run (and given back if it succeeds), so
parallel attempts cannot race past it; one client address (IPv6: its /64) may hold at most
`max_unauthenticated_per_client` connections that have not logged in; a session must log in
within `login_timeout` and ends after `max_session_time`, whatever it sends. Neither the
default thread pool nor the other parts of the process share the hashing or Maildir threads.

Failure: a client's I/O error, TLS error or timeout ends that connection only, deleting
nothing; an unexpected exception is logged and ends that connection without its text reaching
the client. Config-independent: `app.py` builds the accounts and settings and calls
`start_pop3`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from maildetour.config.model import Pop3Settings
from maildetour.core.client_key import client_key
from maildetour.core.password import hash_password, verify_password
from maildetour.mailbox.maildir import (
    READ_CHUNK,
    MaildirMessage,
    list_messages,
    open_message,
    remove,
)
from maildetour.metrics import Metrics
from maildetour.pop3.events import (
    CheckLogin,
    Close,
    Effect,
    Expunge,
    LoginAccepted,
    LoginInUse,
    LoginRefused,
    LoginResult,
    LoginUnavailable,
    Pop3Message,
    Send,
    SendMessage,
    StartTls,
)
from maildetour.pop3.protocol import (
    MESSAGE_GONE,
    TOO_MANY_CONNECTIONS,
    Pop3Session,
    State,
)
from maildetour.pop3.throttle import LoginThrottle
from maildetour.pop3.wire import MessageEncoder

log = logging.getLogger(__name__)

# Received bytes buffered per connection before we stop reading from its socket.
_MAX_INBOX = 256 * 1024


@dataclass(frozen=True, slots=True)
class Pop3Account:
    """A mailbox that may log in: its address (the login name, any case), its Maildir root,
    and at most one of a clear-text password or a hash (`core.password`: `{ARGON2ID}...`,
    `scrypt$...`, or what `pop3.passwd_file` gives)."""

    address: str
    maildir: Path
    password: str | None = None
    password_hash: str | None = None


class Pop3Server:
    """Handle on the running listeners and their sessions; listeners come and go on reload."""

    def __init__(self, service: _Service) -> None:
        self._service = service
        self._listeners: dict[tuple[str, int, bool], asyncio.Server] = {}  # (host, port, implicit TLS)

    @property
    def servers(self) -> list[asyncio.Server]:
        return list(self._listeners.values())

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [_bound(s) for (_, _, tls), s in self._listeners.items() if not tls]

    @property
    def tls_addresses(self) -> list[tuple[str, int]]:
        return [_bound(s) for (_, _, tls), s in self._listeners.items() if tls]

    @property
    def listening(self) -> set[tuple[str, int, bool]]:
        """The configured (host, port, implicit TLS) of every listener."""
        return set(self._listeners)

    async def listen(self, host: str, port: int, *, tls: bool, context: ssl.SSLContext | None = None) -> None:
        """Add a listener: plain (STLS offered when there is a certificate) or implicit TLS
        (with `context`, for a reload that brings its certificate; else the current one)."""
        service = self._service
        loop = asyncio.get_running_loop()
        context = context or service.ssl_context
        if not tls:
            server = await loop.create_server(lambda: _Connection(service, implicit_tls=False), host, port)
        elif context is None:
            raise ValueError("pop3 listen_tls needs a TLS certificate (ssl_context)")
        else:
            server = await loop.create_server(
                lambda: _Connection(service, implicit_tls=True), host, port, ssl=_following(service, context),
                ssl_handshake_timeout=service.settings.tls_handshake_timeout)
        self._listeners[(host, port, tls)] = server

    def stop_listening(self, host: str, port: int, *, tls: bool) -> None:
        """Close one listener; its sessions go on to their end."""
        server = self._listeners.pop((host, port, tls), None)
        if server is not None:
            server.close()

    def configure(self, *, accounts: Mapping[str, Pop3Account], settings: Pop3Settings,
                  ssl_context: ssl.SSLContext | None, hostname: str) -> None:
        """A reload: accounts, settings and certificate for logins and handshakes from now on.
        The login throttle keeps what it counted (a reload must not reset a guessing client);
        the thread pools keep their size until a restart."""
        service = self._service
        service.accounts = {a.address.lower(): a for a in accounts.values()}
        service.settings, service.ssl_context, service.hostname = settings, ssl_context, hostname
        service.throttle.set_limits(per_client=settings.max_failures_per_client,
                                    per_mailbox=settings.max_failures_per_mailbox,
                                    window=settings.failure_window, max_tracked=settings.max_tracked_failures)

    def count_logins(self, metrics: Metrics | None) -> None:
        """Count login results (ok, failed, throttled, in_use, unavailable) in `metrics` from now on."""
        self._service.metrics = metrics

    def close(self) -> None:
        """Stop listening and drop every session (a dropped session deletes nothing)."""
        for server in self._listeners.values():
            server.close()
        for connection in list(self._service.connections):
            connection.abort()

    async def wait_closed(self) -> None:
        for server in self._listeners.values():
            await server.wait_closed()
        tasks = list(self._service.tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._service.shutdown()


def _following(service: _Service, listener: ssl.SSLContext) -> ssl.SSLContext:
    """`listener`, for an implicit-TLS listener: each handshake switches to the service's
    current context, so a certificate replaced by a reload serves the next client (Python
    calls `sni_callback` for every ClientHello, with or without a server name)."""

    def follow(connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        current = service.ssl_context
        if current is not None and current is not connection.context:
            connection.context = current

    listener.sni_callback = follow
    return listener


async def start_pop3(*, listen: Sequence[tuple[str, int]], listen_tls: Sequence[tuple[str, int]],
                     accounts: Mapping[str, Pop3Account], ssl_context: ssl.SSLContext | None,
                     settings: Pop3Settings, hostname: str,
                     clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None) -> Pop3Server:
    """Listen on every (host, port) of `listen` (plain, STLS offered when `ssl_context` is set)
    and `listen_tls` (implicit TLS, needs `ssl_context`). Port 0 picks a free port; see
    `Pop3Server.addresses`. Account keys are ignored; addresses match case-insensitively."""
    if listen_tls and ssl_context is None:
        raise ValueError("pop3 listen_tls needs a TLS certificate (ssl_context)")
    loop = asyncio.get_running_loop()
    password_pool = ThreadPoolExecutor(settings.password_workers, "maildetour-pop3-password")
    try:
        # Unknown users get a hash run against this (argon2id, what `maildetour passwd` makes), so a
        # refusal takes as long either way (an account with an older scrypt hash: about as long).
        dummy_hash = await loop.run_in_executor(password_pool, hash_password, "unused")
    except BaseException:
        password_pool.shutdown(wait=False)
        raise
    service = _Service(
        accounts={a.address.lower(): a for a in accounts.values()}, settings=settings,
        hostname=hostname, ssl_context=ssl_context, clock=clock, dummy_hash=dummy_hash,
        password_pool=password_pool)
    service.metrics = metrics
    server = Pop3Server(service)
    try:
        for host, port in listen:
            await server.listen(host, port, tls=False)
        for host, port in listen_tls:
            await server.listen(host, port, tls=True)
    except BaseException:
        server.close()
        service.shutdown()
        raise
    return server


class _Service:
    """State shared by the sessions of one server: accounts, locks, throttle, live sessions,
    connections not logged in per client, and the two thread pools (password hashing; Maildir I/O)."""

    def __init__(self, *, accounts: dict[str, Pop3Account], settings: Pop3Settings,
                 hostname: str, ssl_context: ssl.SSLContext | None,
                 clock: Callable[[], float], dummy_hash: str,
                 password_pool: ThreadPoolExecutor) -> None:
        self.accounts = accounts
        self.settings = settings
        self.hostname = hostname
        self.ssl_context = ssl_context
        self.clock = clock
        self.dummy_hash = dummy_hash
        self.metrics: Metrics | None = None  # where login results are counted
        self.locked: set[str] = set()
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.throttle = LoginThrottle(
            per_client=settings.max_failures_per_client,
            per_mailbox=settings.max_failures_per_mailbox,
            window=settings.failure_window, max_tracked=settings.max_tracked_failures)
        self.unauthenticated: Counter[str] = Counter()  # client_key -> connections not logged in
        self.waiting: dict[_Connection, str] = {}  # connections not logged in, oldest first -> client_key
        self.password_pool = password_pool
        self.io_pool = ThreadPoolExecutor(settings.io_workers, "maildetour-pop3-io")

    def make_room(self, newcomer: str) -> bool:
        """All connections are taken and client `newcomer` wants one: close the oldest
        connection not logged in of the client holding the most such connections, if that
        client holds more than `newcomer` does. True when room was made. So clients flooding
        from many addresses cannot keep the owner out (issue 10: ten addresses could): they
        only push each other out, while a login takes one round trip."""
        if not self.unauthenticated:
            return False
        biggest, held = max(self.unauthenticated.items(), key=lambda item: item[1])
        if held <= self.unauthenticated.get(newcomer, 0):
            return False
        victim = next(c for c, key in self.waiting.items() if key == biggest)
        log.info("pop3: all %d connections taken; closing one not logged in from %s for %s",
                 self.settings.max_connections, biggest, newcomer)
        victim.evict()
        return True

    def shutdown(self) -> None:
        """Let the pools' threads end (a running hash or read finishes; nothing waits)."""
        self.password_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=False, cancel_futures=True)


class _Connection(asyncio.Protocol):
    def __init__(self, service: _Service, *, implicit_tls: bool) -> None:
        self._service = service
        self._implicit_tls = implicit_tls
        self._transport: asyncio.Transport | None = None
        self._inbox: deque[bytes] = deque()
        self._inbox_size = 0
        self._reading_paused = False
        self._wakeup = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._eof = False
        self._peer = ""
        self._account: Pop3Account | None = None
        self._listing: list[MaildirMessage] = []
        self._lock: str | None = None
        self._session: Pop3Session | None = None
        self._unauthenticated: str | None = None  # our client key while not logged in
        self._streaming = False  # inside a RETR/TOP response: no other reply may go out
        self._deadline: asyncio.Timeout | None = None  # login_timeout, then max_session_time
        self._session_end = 0.0  # loop time

    # --- asyncio.Protocol callbacks ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not isinstance: uvloop's transports are no asyncio.Transport subclasses.
        self._transport = transport = cast(asyncio.Transport, transport)
        service = self._service
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        key = client_key(self._peer)
        if len(service.connections) >= service.settings.max_connections and not service.make_room(key):
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        if service.unauthenticated[key] >= service.settings.max_unauthenticated_per_client:
            log.info("pop3 %s: too many connections not logged in from this client", self._peer)
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        service.unauthenticated[key] += 1
        self._unauthenticated = key
        service.waiting[self] = key
        service.connections.add(self)
        self._session = Pop3Session(
            settings=service.settings, hostname=service.hostname,
            tls_active=self._implicit_tls, tls_available=service.ssl_context is not None,
            peer_is_loopback=_is_loopback(self._peer))
        task = asyncio.get_running_loop().create_task(self._serve(self._session))
        service.tasks.add(task)
        task.add_done_callback(service.tasks.discard)

    def data_received(self, data: bytes) -> None:
        self._inbox.append(data)
        self._inbox_size += len(data)
        if self._inbox_size > _MAX_INBOX and self._transport and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
        self._wakeup.set()

    def eof_received(self) -> bool:
        self._eof = True
        self._wakeup.set()
        return True  # half-close: answer what was sent before the EOF, then close ourselves

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wakeup.set()
        self._writable.set()
        self._service.connections.discard(self)
        self._authenticated()

    def _authenticated(self) -> None:
        """No longer an unauthenticated connection of its client (logged in, or gone)."""
        key, self._unauthenticated = self._unauthenticated, None
        if key is not None:
            counts = self._service.unauthenticated
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]
            self._service.waiting.pop(self, None)

    def evict(self) -> None:
        """Make room for another client (`_Service.make_room`): counted out now, closed soon."""
        self._service.connections.discard(self)
        self._authenticated()
        if self._transport is not None:
            self._transport.write(TOO_MANY_CONNECTIONS)
            self._transport.close()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # --- the session ---------------------------------------------------------------------------
    async def _serve(self, session: Pop3Session) -> None:
        settings = self._service.settings
        now = asyncio.get_running_loop().time()
        self._session_end = now + settings.max_session_time
        try:
            try:
                async with asyncio.timeout_at(
                        min(now + settings.login_timeout, self._session_end)) as self._deadline:
                    await self._converse(session)
            except TimeoutError:
                if self._deadline is None or not self._deadline.expired():
                    raise
                log.info("pop3 %s: %s", self._peer, "session time limit" if self._account
                         else "no login in time")
                self._expire(session)
        except (ConnectionError, ssl.SSLError, TimeoutError, OSError) as error:
            log.info("pop3 %s: connection ended: %s", self._peer, type(error).__name__)
        except Exception:
            log.exception("pop3 %s: unexpected error", self._peer)
        finally:
            if self._lock is not None:
                self._service.locked.discard(self._lock)
                self._lock = None
            if self._transport is not None:
                self._transport.close()
            self._service.connections.discard(self)
            self._authenticated()

    async def _converse(self, session: Pop3Session) -> None:
        await self._perform([session.greeting()])
        while session.state is not State.CLOSED:
            data = await self._read()
            if data is None:
                await self._perform(session.timed_out())
                break
            if not data:
                break
            await self._perform(session.receive(data))

    def _expire(self, session: Pop3Session) -> None:
        """A deadline passed: say so if the reply can go out at once (no waiting), close."""
        # Between two TLS layers, or inside a message being sent: a reply would land in the
        # handshake or in the message. Just close (the client sees no final "." and retries).
        pending = session.state is State.TLS_PENDING or self._streaming
        for effect in session.expired():
            transport = self._transport
            if isinstance(effect, Send) and transport and not transport.is_closing() and not pending:
                transport.write(effect.data)
        if self._transport is not None:
            self._transport.close()

    async def _read(self) -> bytes | None:
        """Next received bytes; b"" at end of input; None after the idle timeout."""
        timeout = self._service.settings.idle_timeout
        while not self._inbox:
            if self._eof:
                return b""
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                return None
        data = b"".join(self._inbox)
        self._inbox.clear()
        self._inbox_size = 0
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        return data

    async def _perform(self, effects: list[Effect]) -> None:
        session = self._session
        assert session is not None
        pending = deque(effects)
        while pending:
            match pending.popleft():
                case Send(data):
                    await self._write(data)
                case SendMessage(index, first_line, body_lines):
                    await self._send_message(self._listing[index], first_line, body_lines)
                case CheckLogin(username, password):
                    pending.extend(session.login_result(await self._login(username, password)))
                case StartTls():
                    await self._start_tls()
                    pending.extend(session.tls_started())
                case Expunge(indexes):
                    pending.extend(session.expunged(await self._expunge(indexes)))
                case Close():
                    if self._transport is not None:
                        self._transport.close()

    async def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("client went away")
        self._transport.write(data)
        if not self._writable.is_set():
            await asyncio.wait_for(self._writable.wait(), self._service.settings.idle_timeout)

    async def _login(self, username: str, password: str) -> LoginResult:
        service = self._service
        loop = asyncio.get_running_loop()
        name = username.lower()
        # Counted as a failure before the password is checked, given back only if it was
        # right: parallel attempts cannot all pass the check while their hash runs.
        reservation = service.throttle.reserve(self._peer, name, service.clock())
        if reservation is None:
            log.warning("pop3 %s: login throttled", self._peer)
            self._count("throttled")
            await asyncio.sleep(service.settings.failed_login_delay)
            return LoginRefused()
        account = service.accounts.get(name)
        matches = await loop.run_in_executor(
            service.password_pool, _password_matches, account, password, service.dummy_hash)
        if account is None or not matches:
            log.info("pop3 %s: login failed", self._peer)
            self._count("failed")
            await asyncio.sleep(service.settings.failed_login_delay)
            return LoginRefused()
        service.throttle.release(reservation)
        if name in service.locked:
            self._count("in_use")
            return LoginInUse()
        service.locked.add(name)
        self._lock = name
        try:
            listing = await loop.run_in_executor(service.io_pool, list_messages, account.maildir)
        except OSError as error:
            log.error("pop3: cannot list mailbox %s: %s", name, error)
            service.locked.discard(name)
            self._lock = None
            self._count("unavailable")
            return LoginUnavailable()
        self._account = account
        self._listing = _unique(listing)
        self._authenticated()
        if self._deadline is not None:
            self._deadline.reschedule(self._session_end)  # login_timeout no longer applies
        log.info("pop3 %s: %s logged in, %d messages", self._peer, name, len(self._listing))
        self._count("ok")
        return LoginAccepted(tuple(Pop3Message(m.uid, m.size) for m in self._listing))

    def _count(self, result: str) -> None:
        if self._service.metrics is not None:
            self._service.metrics.pop3_login(result)

    async def _send_message(self, message: MaildirMessage, first_line: bytes,
                            body_lines: int | None) -> None:
        assert self._account is not None
        loop = asyncio.get_running_loop()
        pool = self._service.io_pool
        handle = await loop.run_in_executor(pool, open_message, self._account.maildir, message)
        if handle is None:
            await self._write(MESSAGE_GONE)
            return
        self._streaming = True
        try:
            await self._write(first_line)
            encoder = MessageEncoder(body_lines)
            while not encoder.done:
                chunk = await loop.run_in_executor(pool, handle.read, READ_CHUNK)
                if not chunk:
                    break
                if out := encoder.feed(chunk):
                    await self._write(out)
            await self._write(encoder.finish())
        finally:
            handle.close()
        self._streaming = False  # not in `finally`: cut off mid-message, it stays cut off

    async def _start_tls(self) -> None:
        assert self._transport is not None and self._service.ssl_context is not None
        # Whatever the client sent after STLS was meant for the plain channel: drop it. No await
        # between this and start_tls, which takes the socket's input from here on.
        self._inbox.clear()
        self._inbox_size = 0
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            self._transport, self, self._service.ssl_context, server_side=True,
            ssl_handshake_timeout=self._service.settings.tls_handshake_timeout)
        if transport is None:
            raise ConnectionResetError("TLS handshake failed")
        self._transport = transport
        self._reading_paused = False

    async def _expunge(self, indexes: tuple[int, ...]) -> int:
        if not indexes:
            return 0
        assert self._account is not None
        doomed = [self._listing[i] for i in indexes]
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._service.io_pool, remove, self._account.maildir, doomed)
        except OSError as error:
            log.error("pop3: cannot remove messages: %s", error)
            return len(doomed)


def _password_matches(account: Pop3Account | None, password: str, dummy_hash: str) -> bool:
    """Blocking (argon2id or scrypt): always one hash run, whether or not the account exists or has a
    clear-text password, so timing tells nothing. An empty password never matches (issue 10
    #10), whatever is stored."""
    if account is None or account.password_hash is None:
        verify_password(dummy_hash, password)
        if account is None or not account.password or not password:
            return False
        return hmac.compare_digest(account.password.encode("utf-8", "surrogatepass"),
                                   password.encode("utf-8", "surrogatepass"))
    return verify_password(account.password_hash, password) and password != ""


def _unique(listing: list[MaildirMessage]) -> list[MaildirMessage]:
    """Drop a second file with the same unique name (a UIDL must be unique in a session)."""
    seen: set[str] = set()
    unique = []
    for message in listing:
        if message.uid not in seen:
            seen.add(message.uid)
            unique.append(message)
    return unique


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _bound(server: asyncio.Server) -> tuple[str, int]:
    host, port = server.sockets[0].getsockname()[:2]
    return str(host), int(port)
