"""`maildetour backup DIR` and `maildetour restore DIR`: a consistent copy of a server's state,
taken while it runs, and the way back into an empty (or stopped) state dir.

What a backup holds, in this order (DIR must be new or empty; made mode 0700, it holds secrets):
  state/queue.sqlite3   the queue database at one moment (SQLite's online backup API)
  state/spool/          the message bytes that copy refers to: messages with copies still to
                        deliver, and bytes kept for late bounces; a message that finished on the
                        live server before its file was copied gets its final rows instead
                        (`store.snapshot.settle`), so no queued copy in the backup lacks bytes
  state/mailboxes/      the Maildirs (new/ before cur/, each message once; tmp/ left empty)
  state/...             the other files of the state dir: audit.jsonl, srs.secret
  files/<path>          the files the config names outside the state dir, under their absolute
                        path: the config itself, DKIM keys, an SRS secret file, TLS certificates
                        and keys, pop3.passwd_file, IMAP password and CA files
  manifest.json         written last (a backup without it is incomplete): versions, the time,
                        counts, and where each file came from
Later mail is not in it: what was acknowledged after the database copy began is not promised.
Every file is fsync'ed, and every directory once its files are in.

`restore` takes the state dir's lock (so it refuses while a server runs there, and no server
starts meanwhile), refuses a state dir that holds anything but the lock and pid files unless
`force` (then the queue database and the spool are replaced; mailbox and other files from the
backup are written over those of the same name, the rest stays), copies `state/` back, puts
back each file of `files/` that is missing at its path (an existing one is left as it is and
reported when it differs), and reports the queued messages whose bytes are missing. A queue
from an older schema is upgraded by the next `serve`, as usual.

Exposure: operator (run as the server's user; the paths are the operator's). Blocking.
Failure: BackupError (an OSError naming the directory: not empty, not a backup), StateDirBusy,
SchemaTooNew, OSError and sqlite3.Error from the files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from maildetour import __version__
from maildetour.config.model import Config
from maildetour.durable import fsync_dir, make_dirs, write_synced
from maildetour.statelock import LOCK_FILE, PID_FILE, hold_state_dir
from maildetour.store import snapshot
from maildetour.store.schema import VERSION, SchemaTooNew

MANIFEST = "manifest.json"
FORMAT = "maildetour-backup 1"
QUEUE_DB = "queue.sqlite3"  # the state dir's layout is Config's (queue_db, spool_dir, mailbox_dir)
# Never copied from a state dir: the live database (copied through SQLite), its journals and
# upgrade copies, the spool and mailboxes (copied on their own), the lock and the pid file.
_JOURNALS = (f"{QUEUE_DB}-wal", f"{QUEUE_DB}-shm", f"{QUEUE_DB}-journal")
_NOT_STATE = (QUEUE_DB, *_JOURNALS, "spool", "mailboxes", LOCK_FILE, PID_FILE)


class BackupError(OSError):
    def __init__(self, where: Path, reason: str) -> None:
        super().__init__(errno.EINVAL, reason, str(where))


@dataclass(frozen=True, slots=True)
class BackupResult:
    directory: Path
    counts: snapshot.Counts | None  # None: there was no queue yet
    spool_files: int
    mailbox_files: int
    files: tuple[Path, ...]  # outside the state dir
    settled: tuple[str, ...]  # finished while the backup ran: their final rows were taken
    missing: tuple[str, ...]  # copies to deliver whose bytes could not be copied


@dataclass(frozen=True, slots=True)
class RestoreResult:
    state_dir: Path
    schema: int | None
    files_written: tuple[Path, ...]
    files_differ: tuple[Path, ...]  # left as they are: the backup's copy differs
    missing: tuple[str, ...]  # queued copies whose bytes are not in the spool
    manifest: dict[str, object] = field(default_factory=dict)


# --- backup ------------------------------------------------------------------------------------
def backup(config: Config, dest: Path) -> BackupResult:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(dest, "exists and is not an empty directory; a backup goes into a new one")
    state = config.server.state_dir
    started = time.time()
    made = _Tree(dest / "state")
    counts = None
    settled: list[str] = []
    missing: list[str] = []
    spool_files = 0
    if config.queue_db.exists():
        db = made.root / QUEUE_DB
        snapshot.take(config.queue_db, db)
        wanted = snapshot.wanted_bytes(db)
        copied = {q for q in sorted(wanted.required | wanted.kept) if made.copy(config.spool_dir / q, f"spool/{q}")}
        spool_files = len(copied)
        gone = wanted.required - copied
        settled = snapshot.settle(db, config.queue_db, sorted(gone)) if gone else []
        missing = sorted(gone - set(settled))
        counts = snapshot.counts(db)
        made.dir("spool")
    mailbox_files = _copy_maildirs(state / "mailboxes", made, "mailboxes")
    for entry in _state_entries(state):
        made.copy_tree(entry, entry.name)
    files = _outside_files(config)
    outside = _Tree(dest / "files")
    for path in files:
        outside.copy(path, str(path).lstrip("/"))
    made.sync()
    outside.sync()
    manifest = {
        "format": FORMAT, "maildetour": __version__, "schema": counts.schema if counts else None,
        "created": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "state_dir": str(state), "config": str(config.path),
        "queue": {"messages": counts.messages, "events": counts.events, "copies": counts.copies} if counts else None,
        "spool_files": spool_files, "mailbox_files": mailbox_files,
        "settled": settled, "missing": missing,
        "files": [{"path": str(p), "copy": f"files/{str(p).lstrip('/')}"} for p in files],
    }
    write_synced(dest / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    fsync_dir(dest)
    return BackupResult(dest, counts, spool_files, mailbox_files, tuple(files), tuple(settled), tuple(missing))


def _outside_files(config: Config) -> list[Path]:
    """The files the config names that live outside the state dir (and exist)."""
    named: list[Path | None] = [config.path, config.smtp.tls_cert, config.smtp.tls_key, config.pop3.tls_cert,
                                config.pop3.tls_key, config.pop3.passwd_file, config.delivery.tls_ca_file]
    if config.signing is not None:
        named += [config.signing.dkim_key, config.signing.ed25519_key]
    if config.srs is not None:
        named.append(config.srs.secret_file)
    for account in config.imap.values():
        named += [account.password_file, account.ca_file]
    state = config.server.state_dir
    found = [p for p in named if p is not None and p.is_file() and not p.is_relative_to(state)]
    return list(dict.fromkeys(found))


def _state_entries(state: Path) -> Iterator[Path]:
    if not state.is_dir():
        return
    for entry in sorted(state.iterdir()):
        if entry.name in _NOT_STATE or entry.name.endswith((".bak", ".tmp")):
            continue
        yield entry


def _copy_maildirs(root: Path, tree: _Tree, under: str) -> int:
    """Every Maildir below `root`: new/ first, then cur/ (a message moved from new/ to cur/
    meanwhile is found in one of them, and copied once); tmp/ is made empty."""
    count = 0
    if not root.is_dir():
        return 0
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        rel = under if here == root else f"{under}/{here.relative_to(root)}"
        if not {"new", "cur"} & set(dirnames):
            continue
        seen: set[str] = set()
        for sub in ("new", "cur"):
            tree.dir(f"{rel}/{sub}")
            for name in sorted(_names(here / sub)):
                unique = name.split(":", 1)[0]
                if unique not in seen and tree.copy(here / sub / name, f"{rel}/{sub}/{name}"):
                    seen.add(unique)
                    count += 1
        tree.dir(f"{rel}/tmp")
        dirnames[:] = [d for d in dirnames if d not in ("new", "cur", "tmp")]
    return count


def _names(directory: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(directory) if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


# --- restore -----------------------------------------------------------------------------------
def read_manifest(source: Path) -> dict[str, object]:
    try:
        manifest = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(source, f"not a complete maildetour backup (no {MANIFEST})") from None
    except (ValueError, UnicodeDecodeError):
        raise BackupError(source, f"{MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(source, f"{MANIFEST} is not a {FORMAT!r} manifest")
    schema = manifest.get("schema")
    if isinstance(schema, int) and schema > VERSION:
        raise SchemaTooNew(source / "state" / QUEUE_DB, schema)
    return manifest


def restore(config: Config, source: Path, *, force: bool = False) -> RestoreResult:
    manifest = read_manifest(source)
    state = config.server.state_dir
    with hold_state_dir(state):  # StateDirBusy while a server runs there
        present = [p for p in state.iterdir() if p.name not in (LOCK_FILE, PID_FILE)]
        if present and not force:
            raise BackupError(state, f"state dir is not empty ({len(present)} entries): restore into an empty one, "
                                     "or stop the server and use --force to replace its queue")
        if force:
            for name in (QUEUE_DB, *_JOURNALS):
                (state / name).unlink(missing_ok=True)
            shutil.rmtree(config.spool_dir, ignore_errors=True)
        tree = _Tree(state, replace=force)
        for entry in sorted((source / "state").iterdir()):
            if entry.name not in _JOURNALS:  # never beside another database than their own
                tree.copy_tree(entry, entry.name)
        tree.sync()
        written, differ = _put_back(source, manifest.get("files"))
        db = config.queue_db
        missing = snapshot.missing_bytes(db, config.spool_dir) if db.exists() else []
    schema = manifest.get("schema")
    return RestoreResult(state, schema if isinstance(schema, int) else None, tuple(written), tuple(differ),
                         tuple(missing), manifest)


def _put_back(source: Path, entries: object) -> tuple[list[Path], list[Path]]:
    """Each file of the backup's `files/` that is missing at its path is written there."""
    written: list[Path] = []
    differ: list[Path] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        path, copy = Path(entry["path"]), source / str(entry.get("copy", ""))
        if not copy.is_file():
            continue
        if not path.exists():
            make_dirs(path.parent)
            _Tree(path.parent).copy(copy, path.name)
            fsync_dir(path.parent)
            written.append(path)
        elif path.read_bytes() != copy.read_bytes():
            differ.append(path)
    return written, differ


# --- durable copies ------------------------------------------------------------------------------
class _Tree:
    """Copies files under `root`, each fsync'ed; `sync` fsyncs every directory written to."""

    def __init__(self, root: Path, *, replace: bool = False) -> None:
        self.root, self.replace = root, replace
        self._dirs: set[Path] = set()
        make_dirs(root)

    def dir(self, rel: str) -> Path:
        path = self.root / rel
        make_dirs(path)
        return path

    def copy(self, src: Path, rel: str) -> bool:
        """Copy the file `src` to `root/rel`; False when `src` is gone (removed meanwhile)."""
        dst = self.root / rel
        make_dirs(dst.parent)
        try:
            source = open(src, "rb")
        except FileNotFoundError:
            return False
        with source:
            info = os.fstat(source.fileno())
            tmp = dst.with_name(f".{dst.name}.copying")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, stat.S_IMODE(info.st_mode))
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                os.utime(tmp, ns=(info.st_atime_ns, info.st_mtime_ns))
                if not self.replace and dst.exists():
                    raise FileExistsError(errno.EEXIST, "exists; not overwriting", str(dst))
                os.replace(tmp, dst)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self._dirs.add(dst.parent)
        return True

    def copy_tree(self, src: Path, rel: str) -> None:
        """A file, or a directory with everything below it (mailboxes: Maildir-wise)."""
        if src.is_dir():
            if rel == "mailboxes":
                _copy_maildirs(src, self, rel)
                return
            self.dir(rel)
            for child in sorted(src.iterdir()):
                self.copy_tree(child, f"{rel}/{child.name}")
        elif src.is_file():
            self.copy(src, rel)

    def sync(self) -> None:
        for directory in sorted(self._dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(directory)
