"""Local delivery into our own Maildir mailboxes.

Internal. Each recipient gets the message with a Return-Path header (the envelope sender) in
front; `mailbox.maildir.deliver` fsyncs the file and the directory before this reports
Delivered. A write error (disk full, permissions) is a TemporaryFailure: the copy is retried.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable, Mapping

from maildetour.core.outcome import Delivered, Outcome, TemporaryFailure
from maildetour.delivery.base import Job
from maildetour.mailbox import maildir


class LocalAgent:
    def __init__(self, mailbox_dir: Callable[[str], Path]) -> None:
        self._mailbox_dir = mailbox_dir

    def batch_key(self, target: str) -> str:
        """Every mailbox copy of a message goes in one job."""
        return ""

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        data = b"Return-Path: <" + job.mail_from.encode("utf-8", "replace") + b">\r\n" + job.data
        outcomes: dict[str, Outcome] = {}
        for recipient in job.recipients:
            try:
                name = await asyncio.to_thread(maildir.deliver, self._mailbox_dir(recipient), data)
                outcomes[recipient] = Delivered(f"250 2.0.0 delivered to mailbox as {name}", relay="local")
            except OSError as exc:
                outcomes[recipient] = TemporaryFailure(f"451 4.3.0 mailbox write failed: {exc.strerror}",
                                                       451, "4.3.0", "the mailbox could not be written", relay="local")
        return outcomes

    async def close(self) -> None:
        return None
