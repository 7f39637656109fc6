"""The channel from an SMTP intake worker to the main process: what it committed, and its counts.

What: one Unix stream socket per worker, made by the main process before it starts the worker
(a socket pair; no port, no path). The worker writes, the main process reads; each message is
one JSON line:
  ["ready", PID]                 the worker serves its listeners
  ["copies", [COPY, ...], BYTES]  copies the worker committed (250 follows): schedule them now;
                                 BYTES: the message, base64, when at most INLINE bytes (the
                                 main process then need not read the spool), else null
  ["report", COPY, OUTCOME]      a late bounce about a delivered copy (`LateBounces`)
  ["count", NAME, ARGS]          a `Metrics` call made in the worker, made again by the main
                                 process (its registry is the one `/metrics` serves)
`encode_*`/`decode_*` turn copies and outcomes into JSON values and back; `decode` checks a
line's shape and raises ValueError for anything else. `Notifier` is the worker's end (writes go
out at once: a notice is in the main process's socket buffer before the 250 it stands for is
sent); `RelayedMetrics` is the worker's `Metrics`, which counts by sending.

Contract: a notice is a hint, never the record: the copy is committed before it is sent, and a
notice lost with a worker killed between its commit and its write is found again by the main
process's sweep of the store (`intake_workers`). Exposure: internal (both ends are our own
processes; the main process still checks every line and drops a worker that sends garbage).
Failure: a closed channel makes `Notifier` drop what it is given (the main process is gone, and
the worker is stopping); ValueError from `decode`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import fields
from typing import Any, Callable, Iterable

from maildetour.core.outcome import (
    Delivered,
    Outcome,
    PermanentFailure,
    TemporaryFailure,
    Unreachable,
)
from maildetour.metrics import Metrics
from maildetour.store.records import Copy

log = logging.getLogger("maildetour.intake")

# Messages up to this size travel with their notice (base64: a third more, and its encoding
# before the 250); the main process reads larger ones from the spool. Measured on the bench:
# the spool read through a thread was 0.4-0.7 ms of the 0.6 ms a worker added to a delivery.
INLINE = 256 * 1024
# A line longer than this is not ours: the largest real one is a message's copies (at most
# smtp.max_recipients routes, each a few targets, ~300 bytes a copy).
MAX_LINE = 16 * 1024 * 1024
_OUTCOMES: dict[str, type[Any]] = {kind.__name__: kind for kind in
                                   (Delivered, TemporaryFailure, PermanentFailure, Unreachable)}
_COPY_NAMES = tuple(f.name for f in fields(Copy))
# The `Metrics` calls a worker makes (inbound sessions, its handler, its late bounces).
COUNTED = frozenset({"accepted", "refused", "settled", "late_bounce"})


def encode_copy(copy: Copy) -> list[Any]:
    return [getattr(copy, name) for name in _COPY_NAMES]


def decode_copy(value: Any) -> Copy:
    if not isinstance(value, list) or len(value) != len(_COPY_NAMES):
        raise ValueError(f"not a copy: {value!r:.200}")
    copy = Copy(*value)
    if not isinstance(copy.id, int) or not isinstance(copy.queue_id, str) or not isinstance(copy.target, str):
        raise ValueError(f"not a copy: {value!r:.200}")
    return copy


def encode_outcome(outcome: Outcome) -> dict[str, Any]:
    return {"type": type(outcome).__name__, **{f.name: getattr(outcome, f.name) for f in fields(outcome)}}


def decode_outcome(value: Any) -> Outcome:
    if not isinstance(value, dict) or value.get("type") not in _OUTCOMES:
        raise ValueError(f"not an outcome: {value!r:.200}")
    values = dict(value)
    kind = _OUTCOMES[values.pop("type")]
    try:
        return kind(**values)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise ValueError(f"not an outcome: {exc}") from None


def decode(line: bytes) -> list[Any]:
    """One line from a worker, its shape checked (ValueError otherwise)."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ValueError(f"not a message: {line[:200]!r}")
    match message:
        case ["ready", int()]:
            pass
        case ["copies", list()] | ["copies", list(), str() | None]:
            pass
        case ["report", _, dict()]:
            pass
        case ["count", str() as name, list()] if name in COUNTED:
            pass
        case _:
            raise ValueError(f"unknown message: {line[:200]!r}")
    return message


class Notifier:
    """The worker's end of the channel. `bytes_of(queue_id)`: the bytes just accepted, if at hand."""

    def __init__(self, writer: asyncio.StreamWriter,
                 bytes_of: Callable[[str], bytes | None] = lambda queue_id: None) -> None:
        self._writer = writer
        self._bytes_of = bytes_of

    def send(self, *message: Any) -> None:
        if self._writer.is_closing():
            return  # the main process is gone; the worker stops
        self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def ready(self, pid: int) -> None:
        self.send("ready", pid)

    def accepted(self, copies: Iterable[Copy]) -> None:
        """The handler's `on_accepted`: committed copies, for the main process to schedule."""
        copies = list(copies)
        data = self._bytes_of(copies[0].queue_id) if copies else None
        inline = base64.b64encode(data).decode("ascii") if data is not None and len(data) <= INLINE else None
        self.send("copies", [encode_copy(c) for c in copies], inline)

    async def report(self, copy: Copy, outcome: Outcome) -> None:
        """`LateBounces`' `report`: the main process's scheduler decides what the bounce means."""
        self.send("report", encode_copy(copy), encode_outcome(outcome))

    async def drain(self) -> None:
        """Wait until what was sent is written (at the worker's stop)."""
        if not self._writer.is_closing():
            try:
                await self._writer.drain()
            except (ConnectionError, OSError):
                pass


class RelayedMetrics(Metrics):
    """A worker's metrics: each count is sent to the main process, which counts it there."""

    def __init__(self, notifier: Notifier) -> None:
        super().__init__()
        self._notifier = notifier

    def accepted(self, recipients: int) -> None:
        self._notifier.send("count", "accepted", [recipients])

    def refused(self, status: str) -> None:
        self._notifier.send("count", "refused", [status])

    def settled(self, status: str, target: str, outcome: Outcome | None = None, *, latency: float = 0.0,
                detours: int = 0) -> None:
        self._notifier.send("count", "settled", [status, target, None if outcome is None else encode_outcome(outcome),
                                                 latency, detours])

    def late_bounce(self, matched: bool) -> None:
        self._notifier.send("count", "late_bounce", [matched])


def count(metrics: Metrics, name: str, args: list[Any]) -> None:
    """Make a worker's `Metrics` call (a "count" message) on the main process's `metrics`."""
    match name, args:
        case "accepted", [int() as recipients]:
            metrics.accepted(recipients)
        case "refused", [str() as status]:
            metrics.refused(status)
        case "settled", [str() as status, str() as target, outcome, float() | int() as latency, int() as detours]:
            metrics.settled(status, target, None if outcome is None else decode_outcome(outcome),
                            latency=float(latency), detours=detours)
        case "late_bounce", [bool() as matched]:
            metrics.late_bounce(matched)
        case _:
            raise ValueError(f"bad count: {name} {args!r:.200}")
