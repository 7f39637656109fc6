"""Retention: the store does not grow without bound. Finished messages (their rows, events and
spool file) go `retention` after their last copy became final; quarantined copies are deleted
`quarantine_retention` after they were quarantined (each None: kept for ever); bytes kept for
late bounces are never purged before their `keep_until` (`delivery.late_bounce_window`).

Internal. `Sweeper.run` (owned by the app's TaskGroup) sweeps every `interval`: it asks the
store for small batches (`batch` rows each, one short transaction in the writer's queue, with
`pause` between them, so accepting and delivering never wait behind a long purge) until a batch
comes back short. Only the `Store` interface is used; each batch is one transaction, so a crash
mid-sweep leaves whole messages (a spool file at most, removed as an orphan at the next start).
The audit log (`audit.jsonl`) is not the store's to shorten: logrotate rotates it and SIGHUP
reopens it (docs/operations.md). Failure: a sweep that fails (a full disk) is logged and tried
again at the next interval; it never stops the server.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Protocol

log = logging.getLogger("maildetour.store")


@dataclass(frozen=True, slots=True)
class RetentionRules:
    retention: float | None  # seconds a finished message is kept (for `trace`) after it finished; None: for ever
    quarantine_retention: float | None  # seconds a quarantined copy waits for the operator; None: for ever
    interval: float  # seconds between sweeps
    batch: int = 500  # rows per transaction
    pause: float = 0.01  # seconds between two batches of one sweep


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What the store keeps beyond the queue, for `maildetour queue` (times: Unix seconds)."""

    finished: int  # finished messages still kept (for `trace`)
    oldest_finished: float | None  # when the oldest of them finished (it goes `retention` after)
    kept_for_late_bounces: int  # finished messages whose bytes are still kept for late bounces
    kept_until: float | None  # when the last of those bytes go
    late_bounces: int  # DSNs that came back to our SRS addresses, still kept
    quarantined: int  # quarantined copies, waiting for the operator
    oldest_quarantined: float | None  # since when the oldest waits


@dataclass(frozen=True, slots=True)
class Swept:
    purged: int  # finished messages removed (rows, events, spool file)
    expired: int  # quarantined copies deleted


class RetentionStore(Protocol):
    """The part of `store.base.Store` the sweeper uses."""

    async def expire_quarantined(self, before: float, now: float, limit: int) -> int: ...

    async def purge_finished(self, before: float, now: float, limit: int) -> int: ...


class Sweeper:
    def __init__(self, store: RetentionStore, rules: RetentionRules, clock: Callable[[], float]) -> None:
        self.store, self.rules, self.clock = store, rules, clock  # `rules` may change on a reload

    async def sweep(self) -> Swept:
        """One sweep: what was due when it began, batch after batch (so it ends, however much
        the load adds meanwhile, and quarantine gets its turn in every sweep)."""
        expired = purged = 0
        rules, now = self.rules, self.clock()
        if rules.quarantine_retention is not None:
            while True:
                done = await self.store.expire_quarantined(now - rules.quarantine_retention, now, rules.batch)
                expired += done
                if done < rules.batch:
                    break
                await asyncio.sleep(rules.pause)
        while rules.retention is not None:
            done = await self.store.purge_finished(now - rules.retention, now, rules.batch)
            purged += done
            if done < rules.batch:
                break
            await asyncio.sleep(rules.pause)
        return Swept(purged, expired)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.rules.interval)
            try:
                swept = await self.sweep()
            except Exception as exc:  # a full disk, a locked database: the next sweep tries again
                log.error("retention sweep failed (%s: %s); trying again in %.0fs",
                          type(exc).__name__, exc, self.rules.interval)
                continue
            if swept.purged or swept.expired:
                log.info("retention: removed %d finished messages, deleted %d quarantined copies",
                         swept.purged, swept.expired)
