"""Schema versions (issue 12): the queue database records its version; `serve` upgrades an older
one in place at start (a copy beside it first, then one transaction), refuses one from a newer
maildetour with one line, and `check` reports the version. The older database is the first
release's, kept as `tests/fixtures/queue-v1.sql` (written by that release's own store)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from maildetour.store.schema import VERSION, SchemaTooNew, open_database, read_version
from maildetour.store.sqlite import SqliteStore
from tests.harness import Server, message, seed_text
from tests.peers.ports import free_port

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "queue-v1.sql"
DELIVERED = "660F0A7C2B1E0A1B2"  # both copies delivered in the first release
QUEUED = "660F0A7C2B1E0C3D4"  # the mailbox copy still queued


def first_release_queue(state: Path) -> Path:
    """The fixture as a database file in `state` (WAL, as that release wrote it), with the spool
    file of the message that still has a copy queued."""
    (state / "spool").mkdir(parents=True)
    db = state / "queue.sqlite3"
    conn = sqlite3.connect(db)
    conn.executescript(FIXTURE.read_text(encoding="utf-8"))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    (state / "spool" / QUEUED).write_bytes(message("v1 queued"))
    return db


def columns(db: Path, table: str) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()


def user_version(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "maildetour.cli", *args], capture_output=True, text=True,
                          timeout=30)


def server_on(directory: Path) -> Server:
    smtp_port = free_port()
    config = directory / "maildetour.toml"
    config.write_text(seed_text(smtp_port=smtp_port, pop3_port=None, gmail="127.0.0.2:9"), encoding="utf-8")
    return Server(directory, config, smtp_port, None)


def test_the_first_releases_queue_is_copied_upgraded_at_start_and_its_queued_copy_delivered(tmp_path: Path) -> None:
    db = first_release_queue(tmp_path / "var")
    server = server_on(tmp_path)
    checked = cli("check", "--config", str(server.config))
    assert checked.returncode == 0, checked.stderr
    assert f"schema version 1; will be upgraded to {VERSION} at start (a copy is kept as queue.sqlite3.v1.bak)" \
        in checked.stdout
    server.start()
    try:
        [delivered] = server.wait_mailbox("ituki@pc.example.net", 1)
        assert b"Subject: v1 queued" in delivered
        server.wait_event(QUEUED, "delivered", target="ituki@pc.example.net")
        trace = server.cli("trace", QUEUED)
        assert "451 4.3.0 mailbox busy" in trace.stdout  # the first release's events are kept
    finally:
        server.stop()
    assert f"schema upgraded from version 1 to {VERSION}" in server.log()

    copy = db.with_name("queue.sqlite3.v1.bak")  # the database as it was, before the upgrade
    assert user_version(copy) == 0 and "origin" not in columns(copy, "copies")
    conn = sqlite3.connect(copy)
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (6,)
    conn.close()

    assert user_version(db) == VERSION
    assert {"origin", "attempt_started"} <= columns(db, "copies") and "finished_at" in columns(db, "messages")
    conn = sqlite3.connect(db)
    # finished in the first release: finished when its last event happened
    assert conn.execute("SELECT finished_at FROM messages WHERE queue_id=?", (DELIVERED,)).fetchone() == (
        1795165201.0,)
    assert conn.execute("SELECT state FROM copies WHERE queue_id=? ORDER BY id", (QUEUED,)).fetchall() == [
        ("delivered",), ("delivered",)]
    conn.close()
    assert f"queue: {db}: schema version {VERSION}\n" in cli("check", "--config", str(server.config)).stdout


def test_a_new_queue_has_the_same_schema_as_an_upgraded_one(tmp_path: Path) -> None:
    """One source for the schema: a new database runs the same migrations an old one gets."""
    upgraded = first_release_queue(tmp_path / "old")
    SqliteStore(upgraded, tmp_path / "old" / "spool", tmp_path / "old" / "audit.jsonl").close()
    new = tmp_path / "new" / "queue.sqlite3"
    SqliteStore(new, tmp_path / "new" / "spool", tmp_path / "new" / "audit.jsonl").close()

    def schema(db: Path) -> dict[str, object]:
        """Each table's columns (name, type, not null, default, key) and each index's definition."""
        conn = sqlite3.connect(db)
        try:
            found: dict[str, object] = {}
            for kind, name, sql in conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name"):
                found[name] = conn.execute(f"PRAGMA table_info({name})").fetchall() if kind == "table" else sql
            return found
        finally:
            conn.close()

    assert schema(new) == schema(upgraded)
    assert user_version(new) == user_version(upgraded) == VERSION
    assert not list((tmp_path / "new").glob("*.bak"))  # nothing to keep from an empty file


def test_a_failed_upgrade_leaves_the_old_database_as_it_was(tmp_path: Path) -> None:
    db = first_release_queue(tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("CREATE INDEX messages_finished ON messages(received_at)")  # in the way of a migration
    conn.close()
    with pytest.raises(sqlite3.OperationalError, match="messages_finished already exists"):
        open_database(db)
    assert "origin" not in columns(db, "copies") and user_version(db) == 0  # not even the first steps
    assert db.with_name("queue.sqlite3.v1.bak").exists()


def test_a_queue_from_a_newer_maildetour_is_refused_with_one_line_and_left_untouched(tmp_path: Path) -> None:
    state = tmp_path / "var"
    db = first_release_queue(state)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {VERSION + 1}")
    conn.close()
    before = db.read_bytes()
    server = server_on(tmp_path)
    served = subprocess.run([sys.executable, "-m", "maildetour.cli", "serve", "--config", str(server.config)],
                            capture_output=True, text=True, timeout=30)
    assert served.returncode == 1
    assert served.stderr.splitlines()[-1] == (
        f"maildetour: {db}: queue database has schema version {VERSION + 1}, newer than this maildetour's "
        f"{VERSION}: run the newer maildetour, or restore a backup")
    assert len([line for line in served.stderr.splitlines() if line.startswith("maildetour:")]) == 1
    assert "Traceback" not in served.stderr
    assert db.read_bytes() == before and not list(state.glob("*.bak"))
    checked = cli("check", "--config", str(server.config))
    assert checked.returncode == 1 and f"schema version {VERSION + 1}, newer" in checked.stderr
    with pytest.raises(SchemaTooNew):
        open_database(db, readonly=True)


def test_the_operators_commands_leave_an_older_queue_to_serve_to_upgrade(tmp_path: Path) -> None:
    """A newer maildetour installed beside an older server that still runs: its commands change
    nothing under the old server's feet, and say in one line what to do."""
    db = first_release_queue(tmp_path / "var")
    server = server_on(tmp_path)
    refusal = (f"maildetour: {db}: queue database has schema version 1, older than this "
               f"maildetour's {VERSION}: start `maildetour serve` once to upgrade it")
    for command in (("queue", "hold", QUEUED), ("trace", QUEUED)):
        done = server.cli(*command)
        assert (done.returncode, done.stderr.strip()) == (1, refusal), command
    conn = open_database(db, readonly=True, any_older=True)
    assert read_version(conn) == 1
    conn.close()
    assert not db.with_name("queue.sqlite3.v1.bak").exists()
