"""Destinations: what the config says about a forward target, and the one walk of a detour chain.

Pure values. A destination may be hidden (never revealed, never bounced), may name a detour
target (where its copies go when it refuses), and may be skipped for messages whose inbound
verdicts meet one of its `skip_when` conditions. `detour_chain` is the only place that follows
detours from one target to the next: routing (`route`, `check`), the config's loop check and
the set of private addresses all use it. Exposure: internal (built from the config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

# The inbound verdicts a destination can be skipped for (`skip_when`), as "<method>-<result>".
SKIP_CONDITIONS = ("spf-fail", "spf-softfail", "dkim-fail", "dmarc-fail")


@dataclass(frozen=True, slots=True)
class Destination:
    address: str  # lowercased
    hidden: bool
    detour: str | None  # lowercased; where refused copies go instead
    detour_after: float  # seconds of temporary failure that also detour
    skip_when: tuple[str, ...] = ()  # of SKIP_CONDITIONS


@dataclass(frozen=True, slots=True)
class Chain:
    steps: tuple[str, ...]  # the target, its detour, that one's detour, ... (lowercased)
    loop: str | None = None  # the step that would come again, when the chain loops


def detour_chain(destinations: Mapping[str, Destination], target: str) -> Chain:
    """Follow detours from `target`; stop before a step repeats (and say which)."""
    steps = [target.lower()]
    while (dest := destinations.get(steps[-1])) is not None and dest.detour:
        if dest.detour in steps:
            return Chain(tuple(steps), dest.detour)
        steps.append(dest.detour)
    return Chain(tuple(steps))
