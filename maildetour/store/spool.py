"""Message bytes on disk, one file per message, written durably.

Blocking (call from a thread). Internal. The spool's directories (`spool/`, `spool/tmp/`) are
made durably when it is opened: each fsync'ed into its parent (issue 10, #13). `write` returns
only after the bytes are fsync'ed and the file renamed to its final name; `sync` fsyncs the
directory so the rename itself is durable — the store calls it once for a whole group of writes,
before committing the queue.
Fails with OSError (disk full, permissions): the caller answers 451 and nothing is promised.
"""

from __future__ import annotations

import os
from pathlib import Path

from maildetour.durable import fsync_dir, make_dirs, write_synced


class Spool:
    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = root
        self.tmp = root / "tmp"
        if create:
            make_dirs(self.root, self.tmp)

    def path(self, queue_id: str) -> Path:
        return self.root / queue_id

    def write(self, queue_id: str, data: bytes) -> None:
        tmp = self.tmp / queue_id
        write_synced(tmp, data)
        os.rename(tmp, self.path(queue_id))

    def sync(self) -> None:
        fsync_dir(self.root)

    def read(self, queue_id: str) -> bytes:
        return self.path(queue_id).read_bytes()

    def remove(self, queue_id: str) -> None:
        try:
            self.path(queue_id).unlink()
        except FileNotFoundError:
            pass

    def names(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_file()}

    def clear_tmp(self) -> None:
        """Half-written files of a crashed run were never acknowledged: remove them."""
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
