"""One server per state dir: an exclusive lock that `serve` takes before anything else.

What: `hold_state_dir(state_dir)` makes the state dir (durably), opens `state_dir/maildetour.lock`
and takes an exclusive flock on it without waiting, writes our pid into it, and holds it until
the block ends. A second `serve` on the same state dir gets `StateDirBusy` — an OSError naming
the state dir and the pid holding the lock, which the command line prints on one line (exit 1)
— before it has touched the queue, the spool or the pid file (issue 10, #11: two schedulers on
one queue, and a second server that deleted the first one's pid file).

With SMTP intake workers (`[server] workers` > 1) a second lock, `maildetour.intake.lock`: each
worker holds it shared while it may write (`share_intake_lock`), and a starting main process
waits to take it exclusively (`wait_for_old_intake`) before it clears spool files nobody
committed, so a worker of the previous run still finishing a write (it dies with its main
process, a moment later) is never cut short.

Contract: the lock lives as long as the open file: the kernel drops it when the process ends in
any way (kill -9 included), so there is never a stale lock to clean up. The lock file itself is
never removed (removing it would let a third server lock a new file while the second still
holds the old one). flock, not fcntl locks: closing any other descriptor of the file (SQLite
does that to its own files) does not drop it.

Exposure: internal; the path is the operator's. Failure: StateDirBusy; OSError when the state
dir cannot be made or the lock file opened. Blocking (a few file operations, at start-up;
`wait_for_old_intake` up to its timeout, normally not at all).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from maildetour.durable import make_dirs

LOCK_FILE = "maildetour.lock"
# Held shared by each SMTP intake worker while it may write; the main process takes it
# exclusively once at start, before it clears half-written spool files (`intake_workers`).
INTAKE_LOCK_FILE = "maildetour.intake.lock"
# Written by the lock's holder once it serves, removed when it stops: how `maildetour queue`
# and `reload` find the server to signal.
PID_FILE = "maildetour.pid"


class StateDirBusy(OSError):
    """Another process holds the state dir's lock. `str(filename)` is the state dir."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(errno.EAGAIN, f"state dir in use by another maildetour serve ({holder})",
                         str(state_dir))
        self.pid = pid


@contextmanager
def hold_state_dir(state_dir: Path) -> Iterator[None]:
    """Hold the state dir's lock for the duration of the block (see the module docstring)."""
    make_dirs(state_dir)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateDirBusy(state_dir, _holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock


def _holder(fd: int) -> int | None:
    """The pid holding the flock on `fd`'s file: from /proc/locks (the kernel's word), else the
    pid the holder wrote into the file."""
    info = os.fstat(fd)
    inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF" ("->" marks a waiter)
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                    pid = int(fields[4]) if fields[4].isdigit() else 0
                    if pid > 0:  # 0: a process outside our pid namespace
                        return pid
    except OSError:
        pass
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def share_intake_lock(state_dir: Path) -> int:
    """An SMTP intake worker: hold the intake lock shared until the process ends (the returned
    descriptor is never closed). Waits while a starting main process holds it exclusively."""
    fd = os.open(state_dir / INTAKE_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def wait_for_old_intake(state_dir: Path, timeout: float) -> None:
    """The main process at start, before `recover()` clears spool files nobody committed: wait
    until no intake worker of an earlier run holds the intake lock (they die with their main
    process, a moment later), so none of their writes is in progress. Raises OSError after
    `timeout` seconds."""
    fd = os.open(state_dir / INTAKE_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(errno.EAGAIN, f"SMTP intake workers of an earlier run still hold "
                                  f"{INTAKE_LOCK_FILE} after {timeout:.0f}s", str(state_dir)) from None
                time.sleep(0.05)
    finally:
        os.close(fd)  # drops the lock: this run's workers take it shared
