"""Bounces (Postfix's bounce(8)): our private DSNs to senders, and DSNs that come back to our
SRS addresses (late bounces).

Internal; a late bounce faces the internet (anyone can send a DSN to an SRS address that
verifies). `DsnWriter.bounce` turns an ordinary copy's failure into a DSN to the original
sender that names only the public address (`core.dsn`) and queues it as a new message from
<>; the scheduler submits its copies. `LateBounces.receive` keeps a DSN sent to one of our SRS
addresses (for `trace`; it is never forwarded) and reports each copy it matches to the
scheduler as refused after the fact: a hidden copy then detours, an ordinary one gets our own
private DSN. Only a copy that left by SMTP (so with an SRS sender) for one of the senders the
SRS address decodes to, and whose bytes we still keep, can match: a report naming a mailbox
copy or an address that is no target of ours changes nothing and answers nothing, so reports
cannot be used to learn where mail goes. The report itself is kept for `trace` only as long as
the bytes of delivered copies are (`delivery.late_bounce_window`); `LateBounces.run` removes
kept bytes past their window.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Awaitable, Callable

from maildetour.core.bounce_report import parse_bounce
from maildetour.core.classify import enhanced_status
from maildetour.core.dsn import build_dsn, failure
from maildetour.core.outcome import Outcome, PermanentFailure
from maildetour.core.received import find_message_id
from maildetour.core.redact import Redactor
from maildetour.metrics import Metrics
from maildetour.store.base import Store
from maildetour.store.records import Copy, Event, Message, NewCopy, new_queue_id

log = logging.getLogger("maildetour.delivery")

# The scheduler's way to take an outcome that arrived after the fact.
Report = Callable[[Copy, Outcome], Awaitable[None]]


class DsnWriter:
    def __init__(self, *, store: Store, hostname: str, redactor: Redactor) -> None:
        self.store, self.hostname, self.redactor = store, hostname, redactor

    async def bounce(self, copy: Copy, outcome: Outcome, now: float) -> tuple[str, list[Copy]]:
        """Queue a DSN about `copy` to its sender; return the DSN's queue id and copies."""
        original = await self.store.read(copy.queue_id)
        dsn = build_dsn(hostname=self.hostname, sender=copy.mail_from,
                        failure=failure(copy.queue_id, copy.recipient, outcome, copy.received_at),
                        original=original, redactor=self.redactor, now=now)
        queue_id = new_queue_id(now)
        message = Message(queue_id, "", now, find_message_id(dsn), len(dsn), "maildetour [dsn]")
        event = Event(now, queue_id, None, "accepted", copy.mail_from, f"DSN for {copy.queue_id}")
        made = await self.store.accept(message, dsn, [NewCopy(copy.mail_from, copy.mail_from, False)], [event])
        return queue_id, made


class LateBounces:
    def __init__(self, *, store: Store, hostname: str, report: Report, left_by_smtp: Callable[[str], bool],
                 keep_for: float, purge_interval: float, clock: Callable[[], float],
                 metrics: Metrics | None = None) -> None:
        """`left_by_smtp(target)`: whether copies to `target` leave by SMTP (with our SRS sender);
        `keep_for`: how long the report's own bytes are kept; `metrics`: where reports are counted."""
        self.store, self.hostname, self.report, self.left_by_smtp = store, hostname, report, left_by_smtp
        self.metrics = metrics
        self.keep_for, self.purge_interval, self.clock = keep_for, purge_interval, clock

    async def receive(self, message: Message, data: bytes, senders: tuple[str, ...]) -> None:
        """A DSN came back to one of our SRS addresses (which decode to `senders`)."""
        now = message.received_at
        report = parse_bounce(data, self.hostname)
        wanted = {s.lower() for s in senders}
        matches: list[tuple[Copy, Outcome]] = []
        for failed in report.failed:
            for queue_id in report.queue_ids:
                copy = await self.store.find_copy(queue_id, failed.address)
                if (copy is not None and copy.state == "delivered" and self.left_by_smtp(copy.target)
                        and copy.mail_from.lower() in wanted and await self.store.kept(copy.queue_id, now)):
                    status = enhanced_status(failed.status) or ""
                    matches.append((copy, PermanentFailure(
                        f"late bounce {message.queue_id}: {failed.status} {failed.diagnostic}", 550,
                        status if status.startswith("5.") else "5.0.0",
                        "refused by the receiving system after it had accepted the message")))
        events = [Event(now, message.queue_id, None, "accepted", "",
                        f"DSN to our SRS address; client={message.client}")]
        events += [Event(now, message.queue_id, None, "late-bounce", c.target,
                         f"reports on {c.queue_id} copy #{c.id}") for c, _ in matches]
        if not matches:
            events.append(Event(now, message.queue_id, None, "quarantined", "",
                                "late bounce matched no copy we delivered and still keep; kept, not forwarded"))
        await self.store.accept(message, data, [], events)
        await self.store.finish(message.queue_id, now + self.keep_for)  # nothing to deliver: purged later
        if self.metrics is not None:
            self.metrics.late_bounce(matched=bool(matches))
        for copy, outcome in matches:
            await self.report(copy, outcome)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.purge_interval)
            try:
                removed = await self.store.purge(self.clock())
            except (OSError, sqlite3.Error) as error:  # a full disk: purged next time
                log.error("messages kept for late bounces not purged: %s", error)
                continue
            if removed:
                log.info("removed %d messages kept for late bounces", removed)
