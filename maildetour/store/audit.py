"""The audit log: every committed event as one JSON line, in state_dir/audit.jsonl.

Blocking (called from the store's writer thread; `reopen` also from the event loop's, so a lock
keeps the two apart: a SIGHUP during a write once closed the file under it). The server's main
process writes it (SMTP intake workers commit through it); an operator's command that changes
the queue appends to the same file: every batch is one write(2) in append mode, so their
lines never mix. Internal; operator-facing (lines name hidden addresses; nothing here
reaches a sender). Each line: `time` (ISO 8601, UTC, microseconds),
`queue_id`, `copy`, `event`, `target`, `detail`. Survives log rotation: when the file was moved
or removed (logrotate's default `create` mode), the next write opens a new one at the path, and
`reopen()` (SIGHUP) does so at once (`copytruncate` works too: the file is opened for append).
Failure: a write error raises OSError to the writer, which has already committed the events
(the database keeps them; `trace` shows them).
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterable

from maildetour.store.records import Event


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: BinaryIO = self._open()

    def _open(self) -> BinaryIO:
        return open(self.path, "ab", buffering=0)

    def write(self, events: Iterable[Event]) -> None:
        lines = [json.dumps({
            "time": datetime.fromtimestamp(e.at, timezone.utc).isoformat(timespec="microseconds"),
            "queue_id": e.queue_id, "copy": e.copy_id, "event": e.kind, "target": e.target, "detail": e.detail,
        }) + "\n" for e in events]
        if not lines:
            return
        data = "".join(lines).encode("utf-8")
        with self._lock:
            if self._replaced():
                self._reopen()
            # One write(2) per batch on an O_APPEND file: a command may append to the same
            # file, and a buffered writer would cut a long batch at 8 KB, mid-line.
            written = self._file.write(data) or 0
            while written < len(data):
                written += self._file.write(data[written:]) or 0

    def reopen(self) -> None:
        with self._lock:
            self._reopen()

    def _reopen(self) -> None:
        """The new file first: if it cannot be opened, the old one stays (OSError raised)."""
        new = self._open()
        self._file.close()
        self._file = new

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def _replaced(self) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._file.fileno())
        return (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino)
