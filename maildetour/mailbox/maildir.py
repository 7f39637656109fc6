"""Maildir mailboxes: durable delivery, and listing/reading/removing for the POP3 server.

Contract: `deliver` (and `deliver_many`, several at once with one fsync of each `new/`)
returns only after the message file is fsync'ed, renamed into `new/` and `new/` itself is
fsync'ed (stdlib `mailbox.Maildir.add` skips the directory fsync and writes
mode 0644; we write 0600 in 0700 directories), and only once the Maildir's directories and any
ancestors it had to make have durable names (`durable.make_dirs`: each fsync'ed into its
parent). `remove` fsyncs the directory it unlinked from. Listing reads names and `stat`s,
never message bodies, when the name carries the sizes.

Exposure: internal. Paths come from the configuration, never from a client; a client only ever
picks among the entries a listing returned. Failure: OSError propagates to the caller (local
delivery turns it into a temporary failure; POP3 into `-ERR [SYS/TEMP]`). Blocking: every
function here does file I/O; async callers run them in an executor.

Names: `<sec>.M<usec>P<pid>R<random>.<host>,S=<file size>,W=<wire size>`, the Dovecot
convention, so Dovecot and we agree on sizes. The part before `:` is the message's unique name;
Dovecot (or any IMAP server) moves files from `new/` to `cur/` and appends `:2,<flags>`, and
the unique name stays — so it is the base of the POP3 UIDL.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from maildetour.durable import fsync_dir, make_dirs, write_synced

_SUBDIRS = ("tmp", "new", "cur")
_SIZE_FIELD = re.compile(r",([SW])=(\d{1,15})(?=[,:]|$)")
_UIDL_SAFE = re.compile(r"[\x21-\x7e]{1,70}")
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class MaildirMessage:
    """One message file as seen by a listing.

    `subdir` is "new" or "cur"; `name` the file name in it (with any `:2,` info); `uid` the
    POP3 unique id derived from the part of the name before `:`; `size` the message's octets
    with CRLF line ends (what POP3 sends before dot-stuffing)."""

    subdir: str
    name: str
    uid: str
    size: int
    mtime_ns: int


def deliver(root: Path, data: bytes) -> str:
    """Store `data` as a new message in the Maildir at `root`; return the file's base name.

    Creates root/{tmp,new,cur} (mode 0700) when missing. Durable on return. Raises OSError."""
    [result] = deliver_many([(root, data)])
    if isinstance(result, OSError):
        raise result
    return result


def deliver_many(messages: Sequence[tuple[Path, bytes]]) -> list[str | OSError]:
    """`deliver` for several messages at once (a group commit): each file written, fsync'ed and
    renamed into its Maildir's `new/`, then each `new/` touched fsync'ed once for all of them.
    Per message, in order: its file's base name, or the OSError that stopped it (a failed
    directory fsync fails every message renamed into that directory: none is durable)."""
    results: list[str | OSError] = []
    renamed: dict[Path, list[int]] = {}  # new/ -> the messages renamed into it
    for index, (root, data) in enumerate(messages):
        try:
            ensure_maildir(root)
            name = _unique_name(len(data), wire_size(data))
            tmp_path = root / "tmp" / name
            write_synced(tmp_path, data)
            try:
                os.rename(tmp_path, root / "new" / name)
            except BaseException:
                _unlink_quietly(tmp_path)
                raise
        except OSError as exc:
            results.append(exc)
            continue
        results.append(name)
        renamed.setdefault(root / "new", []).append(index)
    for directory, indexes in renamed.items():
        try:
            fsync_dir(directory)
        except OSError as exc:
            for index in indexes:
                results[index] = exc
    return results


def ensure_maildir(root: Path) -> None:
    """Create root, its missing ancestors and its tmp/new/cur (mode 0700), durably: each new
    directory's parent is fsync'ed (issue 10, #13: `mailboxes/` itself too, or a power cut takes
    a new mailbox's first messages along)."""
    make_dirs(*(root / sub for sub in _SUBDIRS))


def list_messages(root: Path) -> list[MaildirMessage]:
    """All messages in new/ and cur/, oldest first (mtime, then uid). Missing dirs: empty.

    Reads a file only when its name lacks `W=` (delivered by someone else), to count its CRLF
    size exactly; our own and Dovecot's deliveries are listed from names and stat alone."""
    messages: list[MaildirMessage] = []
    for sub in ("new", "cur"):
        try:
            scan = os.scandir(root / sub)
        except FileNotFoundError:
            continue
        with scan:
            for entry in scan:
                message = _entry(root, sub, entry)
                if message is not None:
                    messages.append(message)
    messages.sort(key=lambda m: (m.mtime_ns, m.uid))
    return messages


def message_path(root: Path, message: MaildirMessage) -> Path:
    return root / message.subdir / message.name


def open_message(root: Path, message: MaildirMessage) -> BinaryIO | None:
    """Open a listed message for reading, following it if it was renamed since the listing
    (an IMAP server set flags). None when it is gone. The caller closes the file."""
    for path in _candidates(root, message):
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            continue
    return None


def remove(root: Path, messages: Iterable[MaildirMessage]) -> int:
    """Delete the given listed messages (following renames); return how many could not be
    removed because of an error other than "already gone". Fsyncs each touched directory."""
    failures = 0
    touched: set[str] = set()
    current: dict[str, tuple[str, str]] | None = None
    for message in messages:
        target: tuple[str, str] | None = (message.subdir, message.name)
        if not (root / message.subdir / message.name).exists():
            if current is None:
                current = {m.uid: (m.subdir, m.name) for m in _list_names(root)}
            target = current.get(message.uid)
        if target is None:
            continue
        try:
            os.unlink(root / target[0] / target[1])
            touched.add(target[0])
        except FileNotFoundError:
            continue
        except OSError:
            failures += 1
    for sub in sorted(touched):
        try:
            fsync_dir(root / sub)
        except OSError:
            failures += 1
    return failures


def uid_for(name: str) -> str:
    """POP3 UIDL for a Maildir file name: the unique part before `:`, or a stable digest of it
    when it is not 1-70 printable ASCII characters (RFC 1939's rule for unique-ids)."""
    unique = name.split(":", 1)[0]
    if _UIDL_SAFE.fullmatch(unique):
        return unique
    return "h" + hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def wire_size(data: bytes) -> int:
    """Octets of `data` with every line ended by CRLF, as POP3 sends it (before dot-stuffing)."""
    counter = WireSizeCounter()
    counter.feed(data)
    return counter.total()


class WireSizeCounter:
    """Counts the CRLF size of a message fed in chunks (bare LF become CRLF; a last line
    without a line end gets CRLF)."""

    __slots__ = ("_octets", "_bare_lf", "_last")

    def __init__(self) -> None:
        self._octets = 0
        self._bare_lf = 0
        self._last = b""

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._octets += len(chunk)
        self._bare_lf += chunk.count(b"\n") - chunk.count(b"\r\n")
        if self._last == b"\r" and chunk[:1] == b"\n":
            self._bare_lf -= 1
        self._last = chunk[-1:]

    def total(self) -> int:
        unterminated = 2 if self._octets and self._last != b"\n" else 0
        return self._octets + self._bare_lf + unterminated


def _entry(root: Path, sub: str, entry: os.DirEntry[str]) -> MaildirMessage | None:
    if entry.name.startswith("."):
        return None
    try:
        info = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    sizes = dict(_SIZE_FIELD.findall(entry.name.split(":", 1)[0]))
    if "W" in sizes:
        size = int(sizes["W"])
    else:
        try:
            size = _count_file(root / sub / entry.name)
        except FileNotFoundError:
            return None
    return MaildirMessage(sub, entry.name, uid_for(entry.name), size, info.st_mtime_ns)


def _list_names(root: Path) -> Iterator[MaildirMessage]:
    for sub in ("new", "cur"):
        try:
            names = os.listdir(root / sub)
        except FileNotFoundError:
            continue
        for name in names:
            if not name.startswith("."):
                yield MaildirMessage(sub, name, uid_for(name), 0, 0)


def _candidates(root: Path, message: MaildirMessage) -> Iterator[Path]:
    yield root / message.subdir / message.name
    for found in _list_names(root):
        if found.uid == message.uid:
            yield root / found.subdir / found.name


def _count_file(path: Path) -> int:
    counter = WireSizeCounter()
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            counter.feed(chunk)
    return counter.total()


def _unique_name(size: int, wsize: int) -> str:
    now = time.time_ns()
    seconds, nanos = divmod(now, 1_000_000_000)
    host = _HOST_UNSAFE.sub("", socket.gethostname())[:32] or "localhost"
    return (
        f"{seconds}.M{nanos // 1000}P{os.getpid()}R{secrets.token_hex(6)}.{host}"
        f",S={size},W={wsize}"
    )


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
