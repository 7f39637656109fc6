"""Durable files and directories: the one place that writes bytes and makes names durable.

Blocking (call from a thread). Internal. `write_synced` returns only after the data is on disk;
`fsync_dir` makes a create, rename or unlink in that directory durable; `make_dirs` makes
directories and their missing ancestors so that their names are durable too (issue 10, #13: a
new directory's entry lives in its parent, which must be fsync'ed after the mkdir, or a power
cut takes the directory and everything acknowledged inside it). Used by the state dir lock, the
spool, the queue database's directory and Maildir delivery. Fails with OSError; a half-written
file is removed.

State: `make_dirs` remembers, for the life of the process, which directories it has made
durable, so a delivery into an existing Maildir costs no extra fsync. This is a fact about the
filesystem, shared by every caller in the process, hence module-wide (guarded by a lock);
a remembered directory that has since disappeared is made again.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

# Directories whose name this process has made durable (their parent fsync'ed after we made or
# first saw them). Read without the lock: a path is added only once its fsync has returned.
_durable_dirs: set[Path] = set()
_durable_lock = threading.Lock()

# fsync of a directory we did not make may be refused where it cannot matter (a filesystem
# that does not sync directories, a read-only or unreadable ancestor): its name is not ours.
_FOREIGN_FSYNC_ERRORS = (errno.EINVAL, errno.EROFS, errno.EACCES, errno.EPERM)


def write_synced(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` (it must not exist), write all of `data`, fsync, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(*paths: Path, mode: int = 0o700) -> None:
    """Make each of `paths` and its missing ancestors (`mode`, less the umask), durably: on
    return, every directory on the way is there and its entry in its parent has been fsync'ed
    after it was made. Directories that already existed but that this process has not yet made
    durable get their parent fsync'ed too (once): another thread or process, or a run that
    crashed, may have made them without it. Raises OSError (NotADirectoryError and
    FileExistsError when a file is in the way)."""
    wanted = [Path(os.path.abspath(path)) for path in paths]
    if all(_known(path) for path in wanted):
        return
    with _durable_lock:
        made: dict[Path, bool] = {}  # directory on the way -> made by this call
        for path in wanted:
            chain: list[Path] = []
            step = path
            while step != step.parent and step not in made and not _known(step):
                chain.append(step)
                step = step.parent
            for directory in reversed(chain):
                made[directory] = _mkdir(directory, mode)
        for parent in sorted({directory.parent for directory in made}, key=_depth, reverse=True):
            ours = any(made[d] for d in made if d.parent == parent)
            try:
                fsync_dir(parent)
            except OSError as exc:
                if ours or exc.errno not in _FOREIGN_FSYNC_ERRORS:
                    raise
        _durable_dirs.update(made)


def _known(path: Path) -> bool:
    if path not in _durable_dirs:
        return False
    if path.is_dir():
        return True
    _durable_dirs.discard(path)  # removed behind our back: make it again
    return False


def _mkdir(path: Path, mode: int) -> bool:
    """Make `path`; True if made now, False if it was there already."""
    try:
        os.mkdir(path, mode)
        return True
    except FileExistsError:
        if path.is_dir():
            return False
        raise


def _depth(path: Path) -> int:
    return len(path.parts)
