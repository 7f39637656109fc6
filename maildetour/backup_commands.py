"""`maildetour backup DIR` and `maildetour restore DIR` (issue 12): what they print; the work is
in `backup`.

Operator-facing. Each function prints what it did and returns the exit code: 0 done; 1 refused
or incomplete (one `maildetour: ` line on stderr per problem): a backup in which copies to
deliver have no bytes, a restore that found queued messages without their spool file. Errors
that stop the command (a non-empty directory, a server holding the state dir, a backup from a
newer maildetour) are OSErrors for `cli` to print on one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from maildetour.backup import backup as take_backup
from maildetour.backup import restore as put_back
from maildetour.config.model import Config


def _warn(text: str) -> None:
    print(f"maildetour: {text}", file=sys.stderr)


def backup(config: Config, dest: Path) -> int:
    done = take_backup(config, dest.resolve())
    if done.counts is None:
        print(f"backup of {config.server.state_dir} in {done.directory}: no queue yet")
    else:
        queued = done.counts.copies.get("queued", 0)
        print(f"backup of {config.server.state_dir} in {done.directory}: queue schema version {done.counts.schema}, "
              f"{done.counts.messages} messages ({queued} copies queued), {done.spool_files} spool files")
    print(f"{done.mailbox_files} mailbox messages; from outside the state dir: "
          + (", ".join(str(p) for p in done.files) or "nothing"))
    if done.settled:
        print(f"{len(done.settled)} messages finished while the backup ran: their final state was taken")
    for queue_id in done.missing:
        _warn(f"{queue_id}: copies to deliver, but its spool file could not be copied")
    return 1 if done.missing else 0


def restore(config: Config, source: Path, force: bool) -> int:
    done = put_back(config, source.resolve(), force=force)
    schema = f"queue schema version {done.schema}" if done.schema is not None else "no queue"
    print(f"restored {source} (made {done.manifest.get('created', '?')}) into {done.state_dir}: {schema}")
    for path in done.files_written:
        print(f"wrote {path}")
    for path in done.files_differ:
        print(f"kept {path} as it is (the backup's copy differs)")
    for queue_id in done.missing:
        _warn(f"{queue_id}: copies to deliver, but no spool file: they will be quarantined at start")
    if done.missing:
        _warn(f"{len(done.missing)} queued messages have no bytes (see above)")
        return 1
    print("start the server to deliver what was queued (`maildetour queue flush` retries deferred copies at once)")
    return 0
