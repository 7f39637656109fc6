"""The channel between an SMTP intake worker and the main process: commits, and counts.

What: one Unix stream socket per worker, made by the main process before it starts the worker
(a socket pair; no port, no path). Each message is one JSON line. The worker says:
  ["ready", PID]                  the worker serves its listeners
  ["accept", N, MESSAGE, [NEWCOPY, ...], [EVENT, ...], BYTES]
                                  commit this message: the main process's store is the queue's
                                  one writer. N numbers the request; BYTES: the message,
                                  base64, when at most INLINE bytes (the main process delivers
                                  it without reading the spool), else null. A message the
                                  rule `store.sqlite.in_database` keeps in the database is
                                  committed with these bytes; a larger one the worker has
                                  written to the spool (fsync'ed) before it asks
  ["finish", N, QUEUE_ID, KEEP_UNTIL]
                                  mark a message finished, its bytes kept until KEEP_UNTIL
                                  (a late bounce's own message: `LateBounces` keeps it a while)
  ["report", COPY, OUTCOME]       a late bounce about a delivered copy (`LateBounces`)
  ["count", NAME, ARGS]           a `Metrics` call made in the worker, made again by the main
                                  process (its registry is the one `/metrics` serves)
and the main process answers each "accept", once its transaction committed or failed:
  ["accepted", N, [COPY, ...]]    committed (and scheduled): the worker may send its 250
  ["finished", N]                 the "finish" committed
  ["refused", N, REASON, FULL]    not committed: the worker answers 451, or 452 when FULL
                                  (the disk is full), and for an "accept" removes its file
`encode_*`/`decode_*` turn records and outcomes into JSON values and back; `decode` (the
worker's lines) and `decode_answer` (the main process's) check a line's shape and raise
ValueError for anything else. `Channel` is the worker's end: `commit` and `finish` ask and
wait for the answer, `listen` reads the answers until the main process closes its end; `RelayedMetrics` is
the worker's `Metrics`, which counts by sending.

Contract: a worker never writes the queue database; only the main process commits, so it
schedules every copy at its commit (nothing to announce, nothing to sweep). Exposure: internal
(both ends are our own processes; each end checks every line: the main process drops a worker
that sends garbage, a worker stops when the main process does). Failure: `Channel.commit`
raises `CommitRefused` (an OSError: the caller answers 451) when the main process refused, and
`ChannelClosed` (an OSError) when it is gone before answering — then whether it committed is
unknown, and the spool file must stay (a restart's `recover` keeps it only when committed);
ValueError from `decode`/`decode_answer`.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
from dataclasses import fields
from typing import Any, Sequence

from maildetour.core.outcome import (
    Delivered,
    Outcome,
    PermanentFailure,
    TemporaryFailure,
    Unreachable,
)
from maildetour.metrics import Metrics
from maildetour.store.records import Copy, Event, Message, NewCopy
from maildetour.store.sqlite import IN_DATABASE

log = logging.getLogger("maildetour.intake")

# Messages up to this size travel with their request (base64: a third more); the main process
# reads larger ones from the spool when it delivers them. Measured on the bench: a spool read
# through a thread was 0.4-0.7 ms of a delivery's time.
INLINE = 256 * 1024
assert IN_DATABASE <= INLINE  # a message kept in the database always travels with its request
# A line longer than this is not ours: the largest real one is a message's bytes (INLINE,
# base64) and its copies (at most smtp.max_recipients routes, each a few targets).
MAX_LINE = 16 * 1024 * 1024
_OUTCOMES: dict[str, type[Any]] = {kind.__name__: kind for kind in
                                   (Delivered, TemporaryFailure, PermanentFailure, Unreachable)}
_COPY_NAMES = tuple(f.name for f in fields(Copy))
_MESSAGE_NAMES = tuple(f.name for f in fields(Message))
_NEW_COPY_NAMES = tuple(f.name for f in fields(NewCopy))
_EVENT_NAMES = tuple(f.name for f in fields(Event))
# The `Metrics` calls a worker makes (inbound sessions, its handler, its late bounces).
COUNTED = frozenset({"accepted", "refused", "settled", "late_bounce"})


class CommitRefused(OSError):
    """The main process did not commit the message (its store failed): answer 451, or 452 when
    its errno says the disk is full (`store.base.disk_full`)."""


class ChannelClosed(OSError):
    """The main process is gone (or stopping) before answering: the commit's fate is unknown."""


def _fields(record: Any, names: tuple[str, ...]) -> list[Any]:
    return [getattr(record, name) for name in names]


def _record(kind: type[Any], names: tuple[str, ...], value: Any, *checks: tuple[str, type | tuple[type, ...]]) -> Any:
    if not isinstance(value, list) or len(value) != len(names):
        raise ValueError(f"not a {kind.__name__}: {value!r:.200}")
    record = kind(*value)
    for name, expected in checks:
        if not isinstance(getattr(record, name), expected):
            raise ValueError(f"not a {kind.__name__}: {value!r:.200}")
    return record


def encode_copy(copy: Copy) -> list[Any]:
    return _fields(copy, _COPY_NAMES)


def decode_copy(value: Any) -> Copy:
    copy: Copy = _record(Copy, _COPY_NAMES, value, ("id", int), ("queue_id", str), ("target", str))
    return copy


def encode_message(message: Message) -> list[Any]:
    return _fields(message, _MESSAGE_NAMES)


def decode_message(value: Any) -> Message:
    message: Message = _record(Message, _MESSAGE_NAMES, value, ("queue_id", str), ("mail_from", str),
                               ("received_at", (int, float)), ("size", int))
    if not message.queue_id.isalnum():  # it names a spool file
        raise ValueError(f"not a queue id: {message.queue_id!r:.50}")
    return message


def encode_new_copy(copy: NewCopy) -> list[Any]:
    return _fields(copy, _NEW_COPY_NAMES)


def decode_new_copy(value: Any) -> NewCopy:
    copy: NewCopy = _record(NewCopy, _NEW_COPY_NAMES, value, ("recipient", str), ("target", str),
                            ("hidden", bool), ("state", str), ("why", str))
    return copy


def encode_event(event: Event) -> list[Any]:
    return _fields(event, _EVENT_NAMES)


def decode_event(value: Any) -> Event:
    event: Event = _record(Event, _EVENT_NAMES, value, ("at", (int, float)), ("queue_id", str),
                           ("kind", str), ("target", str), ("detail", str))
    return event


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


def _load(line: bytes) -> list[Any]:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ValueError(f"not a message: {line[:200]!r}")
    return message


def decode(line: bytes) -> list[Any]:
    """One line from a worker, its shape checked (ValueError otherwise)."""
    message = _load(line)
    match message:
        case ["ready", int()]:
            pass
        case ["accept", int(), list(), list(), list(), str() | None]:
            pass
        case ["finish", int(), str(), float() | int() | None]:
            pass
        case ["report", _, dict()]:
            pass
        case ["count", str() as name, list()] if name in COUNTED:
            pass
        case _:
            raise ValueError(f"unknown message: {line[:200]!r}")
    return message


def decode_answer(line: bytes) -> list[Any]:
    """One line from the main process, its shape checked (ValueError otherwise)."""
    message = _load(line)
    match message:
        case ["accepted", int(), list()] | ["finished", int()] | ["refused", int(), str(), bool()]:
            pass
        case _:
            raise ValueError(f"unknown answer: {line[:200]!r}")
    return message


class Channel:
    """The worker's end of the channel."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._asked: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        """The main process is gone (or stopping): no commit can be asked for."""
        return self._closed or self._writer.is_closing()

    def send(self, *message: Any) -> None:
        if self._writer.is_closing():
            return  # the main process is gone; the worker stops
        self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def ready(self, pid: int) -> None:
        self.send("ready", pid)

    async def commit(self, message: Message, data: bytes, copies: Sequence[NewCopy],
                     events: Sequence[Event]) -> list[Copy]:
        """Have the main process commit `message` (a small one with `data`, `in_database`; a
        larger one's bytes already in the spool); its copies as committed. Raises CommitRefused
        or ChannelClosed (module docstring)."""
        inline = base64.b64encode(data).decode("ascii") if len(data) <= INLINE else None
        copies_made: list[Copy] = await self._ask("accept", encode_message(message),
                                                  [encode_new_copy(c) for c in copies],
                                                  [encode_event(e) for e in events], inline)
        return copies_made

    async def finish(self, queue_id: str, keep_until: float | None) -> None:
        """Have the main process mark a message finished (`Store.finish`). Raises as `commit`."""
        await self._ask("finish", queue_id, keep_until)

    async def _ask(self, kind: str, *request: Any) -> Any:
        if self.closed:
            raise ChannelClosed("the main process is gone")
        self._next += 1
        token = self._next
        answer = self._asked[token] = asyncio.get_running_loop().create_future()
        try:
            self.send(kind, token, *request)
            return await answer
        finally:
            self._asked.pop(token, None)

    async def listen(self, reader: asyncio.StreamReader) -> None:
        """Take the main process's answers until it closes its end (or says what we cannot
        read): then every commit still waiting fails with ChannelClosed."""
        try:
            while line := await reader.readline():
                self._hear(decode_answer(line))
        except (ValueError, ConnectionError, OSError, asyncio.LimitOverrunError) as exc:
            log.error("the main process's answer could not be read (%s)", exc)
        finally:
            self._closed = True
            for answer in self._asked.values():
                if not answer.done():
                    answer.set_exception(ChannelClosed("the main process closed the channel"))

    def _hear(self, answer: list[Any]) -> None:
        answer_to = self._asked.get(answer[1])
        if answer_to is None or answer_to.done():
            return  # its session gave up meanwhile (cannot happen: commits are shielded)
        match answer:
            case ["accepted", _, list() as copies]:
                answer_to.set_result([decode_copy(c) for c in copies])
            case ["finished", _]:
                answer_to.set_result(None)
            case ["refused", _, str() as reason, bool() as full]:
                answer_to.set_exception(CommitRefused(errno.ENOSPC if full else None, reason))

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

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel

    def accepted(self, recipients: int) -> None:
        self._channel.send("count", "accepted", [recipients])

    def refused(self, status: str) -> None:
        self._channel.send("count", "refused", [status])

    def settled(self, status: str, target: str, outcome: Outcome | None = None, *, latency: float = 0.0,
                detours: int = 0) -> None:
        self._channel.send("count", "settled", [status, target, None if outcome is None else encode_outcome(outcome),
                                                 latency, detours])

    def late_bounce(self, matched: bool) -> None:
        self._channel.send("count", "late_bounce", [matched])


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
