"""Destinations: what the config says about a forward target, and the one walk of a detour chain.

Pure values. A destination may be hidden (never revealed, never bounced), may name detour steps
(where its copies go when it refuses: local mailboxes, SMTP addresses or IMAP accounts written
"imap:NAME", tried in order), and may be skipped for messages whose inbound verdicts meet one
of its `skip_when` conditions. `detour_chain` is the only place that follows detours: routing
(`route`, `check`), policy (which step comes next, and when), the config's loop check and the
set of private addresses all use it. Exposure: internal (built from the config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

# The inbound verdicts a destination can be skipped for (`skip_when`), as "<method>-<result>".
SKIP_CONDITIONS = ("spf-fail", "spf-softfail", "dkim-fail", "dmarc-fail")
# A detour step that appends into an IMAP account: "imap:NAME" names `[imap."NAME"]`.
IMAP_PREFIX = "imap:"


@dataclass(frozen=True, slots=True)
class Destination:
    address: str  # lowercased
    hidden: bool
    detour: tuple[str, ...]  # steps, in order: addresses (lowercased) or "imap:NAME"
    detour_after: float  # seconds of temporary failure before a step hands the copy on
    skip_when: tuple[str, ...] = ()  # of SKIP_CONDITIONS
    tls: str | None = None  # its own TLS mode for SMTP (config.model.TLS_MODES), beats the domain's


@dataclass(frozen=True, slots=True)
class Step:
    target: str  # an address or "imap:NAME"
    deadline: float | None  # temporary failures this long go to the next step; None: the last


@dataclass(frozen=True, slots=True)
class Chain:
    steps: tuple[Step, ...]  # the first is the target itself
    loop: tuple[str, ...] | None = None  # when the detours loop: the path that closes the loop

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(step.target for step in self.steps)

    def after(self, target: str) -> Step | None:
        """The step that follows `target`; None when it is the last (or not in the chain)."""
        targets = self.targets
        if target in targets and targets.index(target) + 1 < len(targets):
            return self.steps[targets.index(target) + 1]
        return None

    def step(self, target: str) -> Step:
        """`target`'s own step (a target not in the chain is a last step: no deadline)."""
        targets = self.targets
        return self.steps[targets.index(target)] if target in targets else Step(target, None)


def is_imap(target: str) -> bool:
    return target.startswith(IMAP_PREFIX)


def detour_chain(destinations: Mapping[str, Destination], target: str) -> Chain:
    """Every step a copy for `target` may take, in order: the target, then each of its detour
    steps, where a step that is itself a destination with detours brings its own steps right
    after it (depth first). A step that appears twice is taken once. Each step's deadline is
    the `detour_after` of its own destination when that has detours, else of the destination
    that lists it; the last step has none (it is retried until it delivers)."""
    order: list[tuple[str, float | None]] = []
    loop: list[str] | None = None

    def walk(step: str, parent_after: float | None, path: tuple[str, ...]) -> None:
        nonlocal loop
        if step in path:
            loop = loop or [*path, step]
            return
        dest = destinations.get(step)
        own = dest.detour_after if dest is not None and dest.detour else parent_after
        if step not in (s for s, _ in order):
            order.append((step, own))
        if dest is not None:
            for nxt in dest.detour:
                walk(nxt, dest.detour_after, (*path, step))

    walk(target.lower(), None, ())
    steps = tuple(Step(t, after) for t, after in order[:-1]) + (Step(order[-1][0], None),)
    return Chain(steps, tuple(loop) if loop else None)
