"""Watch Maildir `new/` directories with Linux inotify and time-stamp each arriving file.

What it does: `MaildirWatch(loop)` wraps an inotify descriptor (libc via ctypes, no extra
package); `add(path, callback)` watches one directory for files that appear in it (created or
renamed into it: IN_CREATE | IN_MOVED_TO); the callback gets (CLOCK_MONOTONIC ns read as soon as
the event is read, file path). Postfix's virtual(8) links a finished file into new/, maildetour
renames it there: both are seen the moment the message is visible to a mailbox reader.

Contract: read-only; the callback runs on the event loop. Exposure: bench-only. Failure: OSError
when inotify is unavailable; an event-queue overflow sets `overflowed` (counts would be wrong:
callers check it and stop rather than report them).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
import time
from pathlib import Path
from typing import Callable

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
IN_Q_OVERFLOW = 0x4000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

Arrival = Callable[[int, Path], None]


class MaildirWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._fd, self._loop = fd, loop
        self._watches: dict[int, tuple[Path, Arrival]] = {}
        self.overflowed = False
        loop.add_reader(fd, self._read)

    def add(self, directory: Path, callback: Arrival) -> None:
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), IN_CREATE | IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory} failed")
        self._watches[wd] = (directory, callback)

    def _read(self) -> None:
        try:
            buf = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        stamp = time.monotonic_ns()
        offset = 0
        while offset < len(buf):
            wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
            name = buf[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
            watch = self._watches.get(wd)
            if watch is not None and name:
                watch[1](stamp, watch[0] / os.fsdecode(name))

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
