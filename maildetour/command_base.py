"""What the operator's commands share: a failure as one line, the queue beside a running
server, and that server's pid.

Operator-facing (`commands`, `queue_commands`, `backup_commands`). `fail` prints
`maildetour: TEXT` on stderr and returns exit code 1; `with_store` runs one piece of work
against the queue the config chooses (`stores`: SQLite or PostgreSQL; through the Store, never
SQL here) with its writer running, and refuses an older queue rather than change it (the
server upgrades it at its start); `server_pid` is the pid
of the `serve` holding the state dir, for signals.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from maildetour.config.model import Config
from maildetour.statelock import PID_FILE
from maildetour.store.base import Store
from maildetour.stores import command_store

T = TypeVar("T")


def fail(text: str) -> int:
    print(f"maildetour: {text}", file=sys.stderr)
    return 1


def with_store(config: Config, work: Callable[[Store], Awaitable[T]], *, readonly: bool) -> T | None:
    """Run `work` against the queue beside a running server (SQLite in the state dir, or the
    PostgreSQL database of `[store] url`); None when there is no queue yet. An older queue is
    read but not changed (SchemaTooOld): the server upgrades it at its start. `work` sees only
    the `Store` protocol, whichever engine runs it."""
    async def main() -> T | None:
        store = command_store(config, readonly=readonly)
        if store is None:
            return None
        try:
            async with store.running():
                return await work(store)
        finally:
            store.close()

    return asyncio.run(main())


def server_pid(config: Config) -> int | None:
    """The pid in the state dir's pid file if that process is a maildetour (a stale file after
    a crash may name an unrelated process, which must not get a signal)."""
    try:
        pid = int((config.server.state_dir / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"maildetour" in cmdline else None
