"""A power cut for tests: a FUSE passthrough that keeps only what was made durable.

Test-only; a peer like the others, in its own process (`python -m tests.peers.powercut BACKING
MOUNTPOINT SURVIVED`, or `power_layer()` from a test). Every operation under MOUNTPOINT goes
through to BACKING, which is therefore what the running program sees (memory and page cache).
Beside it the layer keeps what strict POSIX durability promises after a power cut, and nothing
more:

- a file's bytes are those it had at its last fsync/fdatasync; a file never synced is empty;
- a directory's entries (made by create, mkdir, rename, unlink, rmdir) are those it had at its
  last fsync of that directory; a directory never synced has none;
- a file or directory survives only if a chain of durable entries leads to it from the root of
  the mount, so a new directory whose parent was never fsync'ed takes everything in it along.
  What was in BACKING when it was mounted counts as durable.

Unmounting is the power cut: the daemon then writes the durable tree into SURVIVED (files 0600,
directories 0700) and exits 0, and the test starts the program again on SURVIVED. This is
stricter than ext4 or XFS, whose journal usually saves a metadata change within seconds: on
purpose, since our promise is "250 means durable", not "usually".

Not modelled (the program under test uses none of them): hard links and symbolic links
(refused with ENOTSUP), permissions and times after the cut, extended attributes, partial or
reordered writes inside one fsync (a sync is all or nothing here). Byte-range and flock locks
are handled by the kernel on its own (the layer implements no `lock`).

Operations run one at a time (`nothreads`): slow, but the model needs no lock.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.peers import peer_unavailable, terminate

try:
    from fuse import FUSE, FuseOSError, Operations
except (ImportError, OSError):  # fusepy missing, or libfuse2 missing (OSError)
    FUSE = None
    FuseOSError = OSError  # type: ignore[assignment,misc]
    Operations = object  # type: ignore[assignment,misc]

_STAT_KEYS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime", "st_ctime")
_ROOT = 0


class DurableLayer(Operations):  # type: ignore[misc]
    """The passthrough and its model of the durable state (see the module docstring)."""

    use_ns = True

    def __init__(self, backing: Path) -> None:
        self.backing = str(backing)
        self.next_id = 1
        self.is_dir: dict[int, bool] = {_ROOT: True}
        self.children: dict[int, dict[str, int]] = {_ROOT: {}}  # what the program sees now
        self.durable_entries: dict[int, dict[str, int]] = {}
        self.durable_data: dict[int, bytes] = {}
        self.open_files: dict[int, int] = {}  # backing fd -> node
        self.counts = {"fsync": 0, "fsyncdir": 0}
        self._adopt(self.backing, _ROOT)

    # --- the model -----------------------------------------------------------------------------
    def _adopt(self, real: str, node: int) -> None:
        """What BACKING held at mount time is durable."""
        with os.scandir(real) as scan:
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    child = self._new(node, entry.name, directory=True)
                    self._adopt(entry.path, child)
                elif entry.is_file(follow_symlinks=False):
                    child = self._new(node, entry.name, directory=False)
                    with open(entry.path, "rb") as handle:
                        self.durable_data[child] = handle.read()
        self.durable_entries[node] = dict(self.children[node])

    def _new(self, parent: int, name: str, *, directory: bool) -> int:
        node, self.next_id = self.next_id, self.next_id + 1
        self.is_dir[node] = directory
        if directory:
            self.children[node] = {}
        self.children[parent][name] = node
        return node

    def _split(self, path: str) -> tuple[int, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        return self._node(head or "/"), name

    def _node(self, path: str) -> int:
        node = _ROOT
        for part in path.split("/"):
            if part:
                try:
                    node = self.children[node][part]
                except KeyError:
                    raise FuseOSError(errno.ENOENT) from None
        return node

    def _real(self, path: str) -> str:
        return self.backing + path

    def materialize(self, out: Path) -> tuple[int, int]:
        """Write the durable tree into `out`; return (directories, files) written."""
        out.mkdir(parents=True, exist_ok=True)
        dirs = files = 0
        stack = [(_ROOT, out)]
        while stack:
            node, where = stack.pop()
            for name, child in self.durable_entries.get(node, {}).items():
                if self.is_dir[child]:
                    (where / name).mkdir(mode=0o700)
                    stack.append((child, where / name))
                    dirs += 1
                else:
                    fd = os.open(where / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(self.durable_data.get(child, b""))
                    files += 1
        return dirs, files

    # --- what the program sees: passthrough ------------------------------------------------------
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None and path is None else os.lstat(self._real(path or "/"))
        attrs = {key: getattr(st, key) for key in _STAT_KEYS}
        for key in ("st_atime", "st_mtime", "st_ctime"):
            attrs[key] = getattr(st, key + "_ns")
        return attrs

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._real(path), amode):
            raise FuseOSError(errno.EACCES)
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._real(path))
        return {key: getattr(st, key) for key in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
            "f_frsize", "f_namemax")}

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._real(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._real(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        os.utime(self._real(path), ns=times) if times else os.utime(self._real(path))
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        parent, name = self._split(path)
        os.mkdir(self._real(path), mode)
        self._new(parent, name, directory=True)
        return 0

    def rmdir(self, path: str) -> int:
        parent, name = self._split(path)
        os.rmdir(self._real(path))
        del self.children[parent][name]
        return 0

    def unlink(self, path: str) -> int:
        parent, name = self._split(path)
        os.unlink(self._real(path))
        del self.children[parent][name]
        return 0

    def rename(self, old: str, new: str) -> int:
        old_parent, old_name = self._split(old)
        new_parent, new_name = self._split(new)
        os.rename(self._real(old), self._real(new))
        self.children[new_parent][new_name] = self.children[old_parent].pop(old_name)
        return 0

    def link(self, target: str, source: str) -> int:
        raise FuseOSError(errno.ENOTSUP)

    def symlink(self, target: str, source: str) -> int:
        raise FuseOSError(errno.ENOTSUP)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise FuseOSError(errno.ENOTSUP)

    def create(self, path: str, mode: int, fi: object = None) -> int:
        parent, name = self._split(path)
        fd = os.open(self._real(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        node = self.children[parent].get(name)
        if node is None:
            node = self._new(parent, name, directory=False)
        self.open_files[fd] = node
        return fd

    def open(self, path: str, flags: int) -> int:
        # Read and write through one descriptor (fsync reads the file back); the kernel gives
        # every write its offset, so O_APPEND is left to it.
        access = os.O_RDONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDWR
        fd = os.open(self._real(path), access | (flags & os.O_TRUNC) | os.O_CLOEXEC)
        self.open_files[fd] = self._node(path)
        return fd

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._real(path or "/"), length)
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    def release(self, path: str | None, fh: int) -> int:
        self.open_files.pop(fh, None)
        os.close(fh)
        return 0

    # --- what makes things durable ---------------------------------------------------------------
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        size = os.fstat(fh).st_size
        chunks, offset = [], 0
        while offset < size:
            chunk = os.pread(fh, min(size - offset, 1 << 20), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        self.durable_data[self.open_files[fh]] = b"".join(chunks)
        self.counts["fsync"] += 1
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        node = self._node(path)
        self.durable_entries[node] = dict(self.children[node])
        self.counts["fsyncdir"] += 1
        return 0


def main(argv: list[str]) -> int:
    backing, mountpoint, survived = (Path(a) for a in argv)
    if FUSE is None:
        print("powercut: fusepy or libfuse2 missing", file=sys.stderr)
        return 1
    layer = DurableLayer(backing)
    FUSE(layer, str(mountpoint), foreground=True, nothreads=True, fsname="powercut", big_writes=True)
    dirs, files = layer.materialize(survived)
    print(f"powercut: {layer.counts['fsync']} fsync, {layer.counts['fsyncdir']} fsyncdir; "
          f"survived {dirs} directories, {files} files", file=sys.stderr)
    return 0


# --- for tests -----------------------------------------------------------------------------------
@dataclass
class PowerLayer:
    """A mounted layer: the program works in `mount`; `cut()` unmounts (the power cut) and
    returns the directory holding what survived."""

    mount: Path
    survived: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def cut(self) -> Path:
        _umount(self.mount)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the power layer did not write what survived:\n" + self.log.read_text())
        assert self.proc.returncode == 0, self.log.read_text()
        return self.survived


def fuse_unavailable() -> str | None:
    """Why a layer cannot be mounted here, or None."""
    if FUSE is None:
        return "fusepy or libfuse2 is missing (pip fusepy; Debian package libfuse2)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "mounting the FUSE layer needs root"
    return None


@contextmanager
def power_layer(directory: Path, *, prepare: dict[str, bytes | None] | None = None) -> Iterator[PowerLayer]:
    """Mount a fresh layer at `directory/disk`. `prepare` puts files (bytes) or directories
    (None) there first, durably (paths relative to the mount). Always unmounted afterwards."""
    reason = fuse_unavailable()
    if reason is not None:
        peer_unavailable(reason)
    backing, mount, survived = directory / "backing", directory / "disk", directory / "survived"
    for path in (backing, mount):
        path.mkdir(parents=True)
    for relative, content in (prepare or {}).items():
        target = backing / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            target.mkdir(mode=0o700, exist_ok=True)
        else:
            target.write_bytes(content)
    log = directory / "powercut.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.peers.powercut", str(backing), str(mount),
                                 str(survived)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mount):
            if proc.poll() is not None or time.monotonic() > deadline:
                peer_unavailable("the FUSE power layer did not mount:\n" + log.read_text())
            time.sleep(0.02)
        yield PowerLayer(mount, survived, proc, log)
    finally:
        if os.path.ismount(mount):
            _umount(mount)
        terminate(proc)


def _umount(mount: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode == 0:
            return
        if not os.path.ismount(mount):
            return
        time.sleep(0.1)  # still busy: a process that used it is just exiting
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
