"""The one delivery interface every destination kind implements.

Internal. A delivery agent takes one `Job` (a message and the recipients that may share one
delivery: `batch_key` says which) and reports an `Outcome` for each recipient. Agents never
raise for a remote refusal or a network problem: those are outcomes. Anything an agent cannot
classify is a `TemporaryFailure`. Kinds: SMTP (`smtp_out`), mailboxes in a local Maildir
(`local`) or by LMTP at a mail store (`lmtp`, `[delivery] lmtp`), IMAP APPEND into an account
(`imap_out`, targets "imap:NAME"). Agents can
wrap agents (maddy's "modifiers in front of a target"): `screen` (skip_when) and `signing`
(SRS, DKIM, ARC) sit in front of the SMTP agent, so the scheduler never asks what an agent is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

from maildetour.core.outcome import Outcome


@dataclass(frozen=True, slots=True)
class Job:
    queue_id: str
    mail_from: str  # envelope sender for this attempt; "" is the null sender <>
    recipients: tuple[str, ...]  # destination addresses with one batch key
    data: bytes  # the whole message, CRLF line endings, as it should arrive
    received_at: float  # when we accepted it (an IMAP APPEND's internal date)


class Agent(Protocol):
    def batch_key(self, target: str) -> str:
        """Copies of one message whose targets have the same key may go in one job."""
        ...

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        """Deliver `job`; return an outcome for every recipient in `job.recipients`."""
        ...

    async def close(self) -> None:
        """Release pooled connections and other resources."""
        ...
