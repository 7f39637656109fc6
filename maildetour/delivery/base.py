"""The one delivery interface every destination kind implements.

Internal. A delivery agent takes one `Job` (a message and the recipients that share a next hop)
and reports an `Outcome` for each recipient. Agents never raise for a remote refusal or a network
problem: those are outcomes. Anything an agent cannot classify is a `TemporaryFailure`.
Kinds: SMTP (`smtp_out`), local Maildir (`local`); an IMAP APPEND agent can be added later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

from maildetour.core.outcome import Outcome


@dataclass(frozen=True, slots=True)
class Job:
    queue_id: str
    mail_from: str  # envelope sender for this attempt; "" is the null sender <>
    recipients: tuple[str, ...]  # destination addresses; for SMTP all in one domain
    data: bytes  # the whole message, CRLF line endings, as it should arrive


class Agent(Protocol):
    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        """Deliver `job`; return an outcome for every recipient in `job.recipients`."""
        ...

    async def close(self) -> None:
        """Release pooled connections and other resources."""
        ...
