"""IMAP APPEND delivery: a detour step "imap:NAME" stores the copy in that account's folder.

What it does: `ImapAgent.deliver(job)` APPENDs `job.data` unchanged (our Received line on top)
into the folder of each "imap:NAME" recipient's account, with no flags and the internal date
`job.received_at` (when we accepted it); one outcome per recipient. `probe(account)` is
`maildetour imap test`: connect, log in, EXAMINE the folder, log out.
Connections: opened at first use (an account no detour needs costs nothing and makes no
noise); then up to `account.connections` logged-in connections per account stay open, one
APPEND at a time each, so a later detour costs only the APPEND command. An idle one gets a NOOP
every `KEEPALIVE` seconds (NAT timers; the server's autologout, RFC 3501 5.4: >= 30 minutes)
and is closed if that fails; there is no other idle limit. A pooled connection found dead when
used (the server closed it while idle) is replaced by a fresh one once, transparently, if the
server had not yet asked for the message (the literal is synchronizing: no "+", nothing
stored); past that point a dead connection is a temporary failure and the copy is tried again
later (at-least-once). `close()` logs out and closes everything.
TLS is always verified (`account.ca_file`, else the system's CAs; the name checked is
`account.host`): implicit TLS, or STARTTLS (`_starttls`) with no fallback to plain text.
Credentials are read again at every login (`imap_auth`): a rotated password or a new token
needs no restart.
Contract: `deliver` returns an outcome for every recipient and `probe` a verdict; neither
raises for remote or network trouble.
Exposure: talks to remote (untrusted) IMAP servers. Their reply text is cleaned and capped
(`_text`) and goes only into private reasons. Reasons are our words plus the place
(user@host:port), never a password or token (aioimaplib's debug log gets the exact argument
to scrub) and never an exception's text; public words are ours and fixed, with no address.
Failure: foreign exceptions become outcomes in one function (`outcome_for_error`), tagged
APPEND replies in another (`outcome_for_append`). Everything short of a tagged NO or BAD to
APPEND is temporary, never Unreachable (the policy keeps retrying the step to its deadline):

  what happened                                       outcome     code  status  alert
  APPEND OK (the reason has the APPENDUID)            Delivered   250   2.0.0
  NO [TRYCREATE]: the folder does not exist           Permanent   550   5.2.0   yes
  NO [NOPERM]: no right to append to the folder       Permanent   550   5.7.1   yes
  NO [OVERQUOTA]: the mailbox is full                 Permanent   552   5.2.2
  NO [OVERQUOTA] "...bandwidth limits" (Gmail's rate) Temporary   451   4.7.0
  NO [LIMIT] or [TOOBIG]; over APPENDLIMIT (ours)     Permanent   552   5.3.4
  NO [UNAVAILABLE], [INUSE], [SERVERBUG]              Temporary   451   4.3.0
  any other NO (content refused, Sieve, a plugin)     Permanent   550   5.7.1
  BAD                                                 Permanent   550   5.5.2
  "imap:NAME" names no configured account             Permanent   550   5.3.5   yes
  refused, unreachable, unknown host, connect timeout Temporary   451   4.4.1
  no reply in time, connection lost                   Temporary   451   4.4.2
  TLS: certificate, name mismatch, handshake, no      Temporary   451   4.7.5
    STARTTLS (not offered or refused), bad ca_file
  login refused (LOGIN or AUTHENTICATE answered NO),  Temporary   451   4.7.0
    password or token command failed
  anything else                                       Temporary   451   4.0.0
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

from aioimaplib.aioimaplib import Response

from maildetour.config.model import ImapAccount
from maildetour.core.destinations import IMAP_PREFIX
from maildetour.core.outcome import Delivered, Outcome, PermanentFailure, TemporaryFailure
from maildetour.delivery.base import Job
from maildetour.delivery.imap_session import (
    PUBLIC_ERROR,
    PUBLIC_LOST,
    Connection,
    ConnectionLost,
    connect,
    mailbox_name,
    outcome_for_error,
    reply_text,
    tls_context,
    where,
)

_RESPONSE_CODE = re.compile(rb"^\[([A-Za-z0-9.-]+)(?: ([^\]]*))?\]")

@dataclass(frozen=True, slots=True)
class _Reply:
    """What a tagged APPEND reply means for us (one row of the table in the header)."""

    code: str  # the response code in brackets, upper case ("" for none)
    text: str  # "" or a word the reply text must contain (lower case)
    temporary: bool
    smtp: int
    status: str
    public: str
    alert: bool = False


_APPEND_REPLIES = (
    _Reply("TRYCREATE", "", False, 550, "5.2.0", "the mailbox folder does not exist", True),
    _Reply("NOPERM", "", False, 550, "5.7.1", "the mailbox folder cannot be written to", True),
    # Gmail's rate limit says OVERQUOTA too: "Account exceeded command or bandwidth limits".
    _Reply("OVERQUOTA", "bandwidth", True, 451, "4.7.0", "the mailbox server is rate limiting"),
    _Reply("OVERQUOTA", "", False, 552, "5.2.2", "the mailbox is full"),
    _Reply("LIMIT", "", False, 552, "5.3.4", "the message is too big for the mailbox"),
    _Reply("TOOBIG", "", False, 552, "5.3.4", "the message is too big for the mailbox"),
    _Reply("UNAVAILABLE", "", True, 451, "4.3.0", PUBLIC_ERROR),
    _Reply("INUSE", "", True, 451, "4.3.0", PUBLIC_ERROR),
    _Reply("SERVERBUG", "", True, 451, "4.3.0", PUBLIC_ERROR),
    _Reply("", "", False, 550, "5.7.1", "refused by the mailbox server"),  # any other NO
)


def outcome_for_append(response: Response, place: str, folder: str) -> Outcome:
    """The outcome a tagged reply to APPEND stands for (the table in the header)."""
    last = response.lines[-1] if response.lines else b""
    text = reply_text([last])
    if response.result == "OK":
        uid = re.search(rb"\[APPENDUID (\d+) (\d+)\]", last, re.IGNORECASE)
        stored = f" as APPENDUID {uid.group(1).decode()} {uid.group(2).decode()}" if uid else ""
        return Delivered(f"{place}: appended to {folder!r}{stored}", 250, "2.0.0",
                         "stored in the mailbox")
    if response.result != "NO":  # BAD, or anything we do not know
        return PermanentFailure(f"{place}: APPEND to {folder!r} answered {response.result}: {text}",
                                550, "5.5.2", "the mailbox server did not understand the request")
    found = _RESPONSE_CODE.match(last)
    code = found.group(1).decode("ascii").upper() if found else ""
    for row in _APPEND_REPLIES:
        if row.code in ("", code) and row.text in text.lower():
            reason = f"{place}: APPEND to {folder!r} refused: NO {text}"
            if row.temporary:  # Gmail's "bandwidth limits": the whole account waits
                return TemporaryFailure(reason, row.smtp, row.status, row.public, slow_down=row.text == "bandwidth")
            return PermanentFailure(reason, row.smtp, row.status, row.public, row.alert)
    raise AssertionError("the last row of _APPEND_REPLIES matches every NO")


class _AccountPool:
    """Per account: its TLS context (made once), the limit on connections in use, the idle ones."""

    __slots__ = ("account", "context", "idle", "slots")

    def __init__(self, account: ImapAccount) -> None:
        self.account = account
        self.slots = asyncio.Semaphore(account.connections)
        self.idle: list[Connection] = []
        self.context: ssl.SSLContext | None = None

    def take(self) -> Connection | None:
        """An idle connection that is still open (dead ones are dropped), or None."""
        while self.idle:
            connection = self.idle.pop()
            connection.cancel_timer()
            if connection.alive:
                return connection
            connection.close()
        return None


class ImapAgent:
    """Delivers "imap:NAME" copies by APPEND; implements `delivery.base.Agent`."""

    def __init__(self, accounts: Mapping[str, ImapAccount], *, keepalive: float) -> None:
        """`keepalive`: seconds between NOOPs on an idle connection (`IMAP_KEEPALIVE`)."""
        self._pools = {name: _AccountPool(account) for name, account in accounts.items()}
        self._keepalive = keepalive
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def batch_key(self, target: str) -> str:
        """One job per step: each account's APPEND is its own delivery."""
        return target

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        results: dict[str, Outcome] = {}
        for target in dict.fromkeys(job.recipients):
            pool = self._pools.get(target.removeprefix(IMAP_PREFIX))
            outcome = await self._deliver(target, job)
            results[target] = dataclasses.replace(outcome, relay=where(pool.account)) if pool else outcome
        return {target: results[target] for target in job.recipients}

    async def close(self) -> None:
        """Stop the keepalives; LOGOUT and close idle connections (busy ones close when done)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        idle = [connection for pool in self._pools.values() for connection in pool.idle]
        for pool in self._pools.values():
            pool.idle.clear()
        await asyncio.gather(*(connection.logout() for connection in idle))

    async def _deliver(self, target: str, job: Job) -> Outcome:
        pool = self._pools.get(target.removeprefix(IMAP_PREFIX)) if target.startswith(IMAP_PREFIX) else None
        if pool is None:
            return PermanentFailure(f"{target}: no such IMAP account configured", 550, "5.3.5",
                                    "the mailbox is not configured", alert=True)
        started = time.monotonic()  # `connect`: waiting for a slot, connecting, logging in
        async with pool.slots:
            connection = pool.take()
            if connection is not None:
                connect = time.monotonic() - started
                outcome = await self._append(pool, connection, job)
                if outcome is not None:
                    return dataclasses.replace(outcome, connect=connect)
                # The server had closed the idle connection: once more, on a fresh one.
            opened = await self._open(pool)
            connect = time.monotonic() - started
            if not isinstance(opened, Connection):
                return dataclasses.replace(opened, connect=connect)
            outcome = await self._append(pool, opened, job)
            if outcome is not None:
                return dataclasses.replace(outcome, connect=connect)
            return TemporaryFailure(f"{opened.place}: the server closed the connection before "
                                    "it asked for the message (append)", 451, "4.4.2", PUBLIC_LOST,
                                    connect=connect)

    async def _open(self, pool: _AccountPool) -> Connection | Outcome:
        if pool.context is None:
            made = tls_context(pool.account)
            if not isinstance(made, ssl.SSLContext):
                return made
            pool.context = made  # made once: loading CA files is blocking work
        return await connect(pool.account, pool.context)

    async def _append(self, pool: _AccountPool, connection: Connection, job: Job) -> Outcome | None:
        """APPEND on `connection`, then pool or close it. None: the connection was dead before
        the server asked for the message (so it cannot have stored it): try a fresh one."""
        account, keep = pool.account, False
        try:
            limit = connection.append_limit()
            if limit is not None and len(job.data) > limit:
                keep = True
                return PermanentFailure(f"{connection.place}: the message ({len(job.data)} bytes) "
                                        f"exceeds the server's APPENDLIMIT {limit} (local check)",
                                        552, "5.3.4", "the message is too big for the mailbox")
            date = datetime.fromtimestamp(job.received_at, timezone.utc)
            protocol = connection.protocol
            protocol.message_asked = False
            response = await connection.call(
                protocol.append(job.data, mailbox=mailbox_name(account.folder), flags=None, date=date))
            keep = True
            return outcome_for_append(response, connection.place, account.folder)
        except (ConnectionLost, OSError) as exc:
            if connection.message_unsent:
                return None
            return outcome_for_error(exc, connection.place, "append")
        except Exception as exc:
            return outcome_for_error(exc, connection.place, "append")
        finally:  # also on cancellation: then the connection is closed, not pooled
            if keep:
                self._checkin(pool, connection)
            else:
                connection.close()

    def _checkin(self, pool: _AccountPool, connection: Connection) -> None:
        if self._closed or not connection.alive:
            connection.close()
            return
        loop = asyncio.get_running_loop()
        connection.timer = loop.call_later(self._keepalive, self._start_keepalive, pool, connection)
        pool.idle.append(connection)

    def _start_keepalive(self, pool: _AccountPool, connection: Connection) -> None:
        """Timer callback: NOOP an idle connection in a task the agent owns (close() ends it)."""
        connection.timer = None
        if connection in pool.idle and not self._closed:
            task = asyncio.get_running_loop().create_task(self._noop(pool, connection))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _noop(self, pool: _AccountPool, connection: Connection) -> None:
        async with pool.slots:  # a connection in use is not idle: NOOP only between APPENDs
            if connection not in pool.idle:
                return
            pool.idle.remove(connection)
            try:
                response = await connection.call(connection.protocol.simple_command("NOOP"))
                healthy = response.result == "OK"
            except Exception:
                healthy = False
            if healthy:
                self._checkin(pool, connection)
            else:
                connection.close()


async def probe(account: ImapAccount) -> tuple[bool, str]:
    """`maildetour imap test`: connect, log in, EXAMINE the folder, log out; append nothing.
    Returns whether it all works and one line that says so, or precisely what is wrong."""
    place = where(account)
    context = tls_context(account)
    if not isinstance(context, ssl.SSLContext):
        return False, context.reason
    opened = await connect(account, context)
    if not isinstance(opened, Connection):
        return False, opened.reason
    try:
        protocol = opened.protocol
        response = await opened.call(protocol.simple_command("EXAMINE", mailbox_name(account.folder)))
        if response.result != "OK":
            return False, (f"{place}: logged in, but the folder {account.folder!r} cannot be "
                           f"opened (does it exist?): {response.result} {reply_text(response.lines[-1:])}")
        exists = [line for line in response.lines
                  if isinstance(line, bytes) and re.fullmatch(rb"\d+ EXISTS", line)]
        count = f", {int(exists[-1].split()[0])} messages" if exists else ""
        return True, (f"{place}: ok: {account.tls} TLS verified, logged in ({account.auth}), "
                      f"folder {account.folder!r} exists{count}")
    except Exception as exc:
        return False, outcome_for_error(exc, place, "examine").reason
    finally:
        await opened.logout()
