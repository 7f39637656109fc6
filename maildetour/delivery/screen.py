"""Screening agent: in front of another agent, copies whose destination's `skip_when` the
message's inbound verdicts meet are not tried at all.

Internal. Reads our own Authentication-Results header of the job's message (`core.authres`),
asks the pure policy (`core.policy.skipped`) per recipient, and hands only the rest to the
agent behind it. A skipped copy reports a refusal (so a hidden destination detours, never
bounces). Built only when inbound checks are on and some destination has `skip_when`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from maildetour.core.authres import find_results, verdict_words
from maildetour.core.destinations import Destination
from maildetour.core.outcome import Outcome
from maildetour.core.policy import skipped
from maildetour.delivery.base import Agent, Job


class ScreeningAgent:
    """Implements `delivery.base.Agent` around `inner`."""

    def __init__(self, inner: Agent, *, destinations: Mapping[str, Destination], authserv_id: str) -> None:
        self.inner, self.destinations, self.authserv_id = inner, destinations, authserv_id

    def batch_key(self, target: str) -> str:
        return self.inner.batch_key(target)

    async def deliver(self, job: Job) -> Mapping[str, Outcome]:
        verdicts: dict[str, str] | None = None
        refused: dict[str, Outcome] = {}
        for rcpt in job.recipients:
            dest = self.destinations.get(rcpt.lower())
            if dest is None or not dest.skip_when:
                continue
            if verdicts is None:
                verdicts = verdict_words(find_results(job.data, self.authserv_id))
            if (refusal := skipped(dest, verdicts)) is not None:
                refused[rcpt] = refusal
        rest = tuple(r for r in job.recipients if r not in refused)
        if not rest:
            return refused
        return {**refused, **await self.inner.deliver(dataclasses.replace(job, recipients=rest))}

    async def close(self) -> None:
        await self.inner.close()
