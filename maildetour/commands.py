"""What each command-line verb does, given its parsed arguments; `cli` parses and dispatches.

Operator-facing. Each function prints its result and returns the exit code: 0 done, 1 nothing
matched, refused or bad input (one line on stderr). Config errors are raised as ConfigError
for `cli` to print. The queue is read and changed only through the store (like postqueue and
postsuper ask the queue owner); a running server is told by signal to pick changes up
(SIGUSR1: flush, SIGUSR2: read the queue again, SIGHUP: read the config again).
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from maildetour import logs, report
from maildetour.config.model import Config
from maildetour.core.address import AddressError, parse_address
from maildetour.core.password import hash_password
from maildetour.core.routing import route as route_address
from maildetour.logs import LogFormat
from maildetour.sign.srs import make_secret_file
from maildetour.store.records import CopyState
from maildetour.store.sqlite import SqliteStore

T = TypeVar("T")


def _fail(text: str) -> int:
    print(f"maildetour: {text}", file=sys.stderr)
    return 1


def serve(config: Config, verbose: bool, log_format: LogFormat = "plain") -> int:
    from maildetour.app import App
    from maildetour.wiring import validate

    validate(config)
    logs.setup(logging.DEBUG if verbose else logging.INFO, log_format)
    asyncio.run(App(config).run())
    return 0


def check(config: Config) -> int:
    from maildetour.wiring import validate

    validate(config)
    print(report.routing_table(config))
    return 0


def reload(config: Config) -> int:
    """Check the config as the server would read it, then SIGHUP the server of its state dir.
    A config that fails the check is not sent (the error is raised for `cli` to print); the
    server checks again and, if it still cannot use it, logs one line and keeps the old."""
    from maildetour.wiring import validate

    validate(config)
    pid = _server_pid(config)
    if pid is None:
        return _fail(f"no server is running on {config.server.state_dir}")
    os.kill(pid, signal.SIGHUP)
    print(f"reload requested from pid {pid}; its log says when the new config is in use")
    return 0


def route(config: Config, text: str) -> int:
    parsed = parse_address(text.strip("<>"))
    if isinstance(parsed, AddressError):
        return _fail(f"{text!r} is not an address we accept: {parsed.reason}")
    table = config.routing_table()
    print(report.route_story(table, route_address(table, parsed), config.imap))
    return 0


# --- the queue ---------------------------------------------------------------------------------
def _with_store(config: Config, work: Callable[[SqliteStore], Awaitable[T]], *, readonly: bool) -> T | None:
    """Run `work` against the queue beside a running server; None when there is no queue yet."""
    if not config.queue_db.exists():
        return None

    async def main() -> T:
        store = SqliteStore(config.queue_db, config.spool_dir, config.audit_log, readonly=readonly)
        try:
            async with store.running():
                return await work(store)
        finally:
            store.close()

    return asyncio.run(main())


def trace(config: Config, key: str) -> int:
    story = _with_store(config, lambda store: store.story(key), readonly=True)
    if story is None:
        return _fail(f"no message with queue id or Message-ID {key!r}")
    print(report.trace(story))
    return 0


def queue_list(config: Config, include_all: bool) -> int:
    states: tuple[CopyState, ...] | None = None if include_all else ("queued", "held", "quarantined")
    copies = _with_store(config, lambda store: store.copies(states, 10_000), readonly=True)
    print(report.queue(copies or []))
    return 0


def queue_flush(config: Config) -> int:
    """Like `postqueue -f`: a running server retries every queued copy now; with no server
    running, every queued copy is due at the next start."""
    pid = _server_pid(config)
    if pid is not None:
        os.kill(pid, signal.SIGUSR1)
        print(f"asked the server (pid {pid}) to retry every queued copy now")
        return 0
    count = _with_store(config, lambda store: store.flush(time.time()), readonly=False)
    if not count:
        print("queue is empty")
    else:
        print(f"no server running; {count} queued copies are due at the next start")
    return 0


def queue_change(config: Config, action: str, queue_id: str) -> int:
    """hold, release or delete the copies of one message (postsuper -h/-H/-d)."""
    def work(store: SqliteStore) -> Awaitable[int]:
        return {"hold": store.hold, "release": store.release, "delete": store.delete}[action](queue_id, time.time())

    count = _with_store(config, work, readonly=False)
    if count is None:
        return _fail("no queue yet")
    if not count:
        wanted = {"hold": "queued", "release": "held or quarantined", "delete": "undelivered"}[action]
        return _fail(f"no {wanted} copies of {queue_id}")
    done = {"hold": "held", "release": "released", "delete": "deleted"}[action]
    print(f"{done} {count} copies of {queue_id}")
    if action == "release":
        return queue_flush(config)
    pid = _server_pid(config)
    if pid is not None:
        os.kill(pid, signal.SIGUSR2)
    return 0


def _server_pid(config: Config) -> int | None:
    """The pid in the state dir's pid file if that process is a maildetour (a stale file after
    a crash may name an unrelated process, which must not get a signal)."""
    from maildetour.app import PID_FILE

    try:
        pid = int((config.server.state_dir / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"maildetour" in cmdline else None


def imap_test(config: Config, name: str) -> int:
    """`maildetour imap test NAME`: one line, exit 0 when the account works."""
    from maildetour.delivery.imap_out import probe

    account = config.imap.get(name.removeprefix("imap:"))
    if account is None:
        return _fail(f"no [imap.\"{name}\"] in {config.path}")
    ok, line = asyncio.run(probe(account))
    if not ok:
        return _fail(f"imap:{account.name}: {line}")
    print(f"imap:{account.name}: {line}")
    return 0


# --- secrets -----------------------------------------------------------------------------------
def passwd() -> int:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            return _fail("the passwords differ")
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if not first:
        return _fail("empty password")
    print(hash_password(first))
    return 0


def dkim_keygen(config: Config, bits: int) -> int:
    from maildetour.sign.dkim import generate_key

    signing = config.signing
    if signing is None:
        return _fail("config error: signing: no [signing] table to make a key for")
    try:
        record = generate_key(signing.dkim_key, bits)
    except FileExistsError:
        return _fail(f"{signing.dkim_key} exists; not overwriting a key")
    print(f"wrote {signing.dkim_key}")
    if config.srs is not None and not config.srs.made_here and make_secret_file(config.srs.secret_file):
        print(f"wrote {config.srs.secret_file} (SRS secret; see docs/operations.md to rotate it)")
    # Zone files take TXT data as strings of at most 255 characters each.
    chunks = " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))
    print(f"publish in DNS:\n{signing.selector}._domainkey.{signing.domain}. IN TXT ( {chunks} )")
    return 0
