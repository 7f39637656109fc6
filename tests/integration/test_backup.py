"""Backup and restore (issue 12): `maildetour backup DIR` copies a running server's state
consistently; `maildetour restore DIR` brings it back into an empty state dir, and every
message acknowledged before the backup began is found again: delivered, or queued and then
delivered by the restored server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from maildetour.store import snapshot
from maildetour.store.records import Event, Message, NewCopy
from maildetour.store.sqlite import IN_DATABASE, SqliteStore
from tests.harness import Server, message, running_server, seed_text
from tests.peers.ports import free_port
from tests.peers.sinks import running_sink


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "maildetour.cli", *args], capture_output=True, text=True,
                          timeout=60)


def subjects(messages: list[bytes]) -> set[str]:
    found = set()
    for data in messages:
        for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.startswith(b"Subject: "):
                found.add(line[9:].decode())
    return found


def second_server(directory: Path, gmail: str) -> Server:
    """A server of its own (ports, state dir) that has not started yet."""
    directory.mkdir(parents=True)
    smtp_port = free_port()
    config = directory / "maildetour.toml"
    config.write_text(seed_text(smtp_port=smtp_port, pop3_port=None, gmail=gmail), encoding="utf-8")
    return Server(directory, config, smtp_port, None)


def test_a_backup_taken_under_load_restores_every_message_acknowledged_before_it(tmp_path: Path) -> None:
    acknowledged: list[tuple[str, float]] = []  # subject, when its 250 was read
    stop = threading.Event()
    # "gmail" answers 451 for ever: the hidden copies stay queued on the first server.
    with running_sink(temp_failures=10**9) as slow_gmail, \
            running_server(tmp_path / "a", gmail=f"{slow_gmail.host}:{slow_gmail.port}") as first:
        def load() -> None:
            count = 0
            while not stop.is_set():
                subject = f"load {count}"
                first.send(message(subject))
                acknowledged.append((subject, time.monotonic()))
                count += 1

        sender = threading.Thread(target=load)
        sender.start()
        try:
            while len(acknowledged) < 40:
                time.sleep(0.05)
            began = time.monotonic()
            backed_up = first.cli("backup", str(tmp_path / "backup"))
            during = sum(1 for _, at in acknowledged if at > began)
        finally:
            stop.set()
            sender.join()
    assert backed_up.returncode == 0, backed_up.stderr
    assert during > 0  # mail kept coming while the backup ran
    before = {subject for subject, at in acknowledged if at < began}
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["missing"] == [] and manifest["queue"]["copies"]["queued"] >= len(before)

    with running_sink() as gmail:
        second = second_server(tmp_path / "b", f"{gmail.host}:{gmail.port}")
        restored = cli("restore", "--config", str(second.config), str(tmp_path / "backup"))
        assert restored.returncode == 0, restored.stderr
        second.start()
        try:
            assert second.cli("queue", "flush").returncode == 0  # deferred copies: now, not at their retry time
            def hidden() -> set[str]:  # queued again, then delivered
                return subjects([m.data for m in gmail.messages])

            def mailbox() -> set[str]:  # restored, or delivered by the second server
                return subjects(second.mailbox("ituki@pc.example.net"))

            deadline = time.monotonic() + 30
            while not (before <= hidden() and before <= mailbox()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert before - hidden() == set() and before - mailbox() == set()
        finally:
            second.stop()


# Over store.sqlite.IN_DATABASE: its bytes go to the spool (smaller ones are in the database).
LARGE = (b"L" * 76 + b"\r\n") * (IN_DATABASE // 78 + 1)


def test_a_message_that_finished_while_its_bytes_were_copied_is_taken_in_its_final_state(tmp_path: Path) -> None:
    live, copy = tmp_path / "live", tmp_path / "copy"
    copy.mkdir()

    async def main() -> None:
        store = SqliteStore(live / "queue.sqlite3", live / "spool", live / "audit.jsonl")
        async with store.running():
            [queued] = await store.accept(Message("Q1", "a@b.example", 100.0, "", 5, "c"), LARGE,
                                          [NewCopy("r@ex.com", "t@ex.org", False)], [])
            await store.accept(Message("Q2", "a@b.example", 100.0, "", 5, "c"), b"small\r\n",
                               [NewCopy("r@ex.com", "t@ex.org", False)], [])  # its bytes: in the database
            snapshot.take(live / "queue.sqlite3", copy / "queue.sqlite3")  # the backup's moment
            await store.update(replace(queued, state="delivered"),
                               [Event(101.0, "Q1", queued.id, "delivered", "t@ex.org", "250 ok")])
            await store.finish("Q1")  # and the server removes its bytes
        store.close()

    asyncio.run(main())
    assert not (live / "spool" / "Q1").exists()
    assert snapshot.wanted_bytes(copy / "queue.sqlite3").required == {"Q1"}
    assert snapshot.settle(copy / "queue.sqlite3", live / "queue.sqlite3", ["Q1"]) == ["Q1"]
    conn = sqlite3.connect(copy / "queue.sqlite3")
    assert conn.execute("SELECT queue_id, state FROM copies ORDER BY queue_id").fetchall() == [
        ("Q1", "delivered"), ("Q2", "queued")]
    assert conn.execute("SELECT kind FROM events").fetchall() == [("delivered",)]
    assert conn.execute("SELECT queue_id, finished, finished_at FROM messages ORDER BY queue_id").fetchall() == [
        ("Q1", 1, 101.0), ("Q2", 0, None)]
    assert conn.execute("SELECT data FROM bodies WHERE queue_id = 'Q2'").fetchall() == [(b"small\r\n",)]
    conn.close()
    assert snapshot.missing_bytes(copy / "queue.sqlite3", copy / "spool") == []


def test_restore_refuses_a_running_server_and_a_state_dir_in_use_and_reports_missing_bytes(tmp_path: Path) -> None:
    with running_sink(temp_failures=10**9) as slow_gmail, \
            running_server(tmp_path / "a", gmail=f"{slow_gmail.host}:{slow_gmail.port}") as server:
        queue_id = server.send(message("kept in the queue") + LARGE)  # a large one: its bytes are a spool file
        assert server.cli("backup", str(tmp_path / "backup")).returncode == 0
        again = server.cli("backup", str(tmp_path / "backup"))
        assert again.returncode == 1 and "not an empty directory" in again.stderr
        busy = server.cli("restore", str(tmp_path / "backup"))
        assert busy.returncode == 1 and "state dir in use by another maildetour serve" in busy.stderr
    not_empty = server.cli("restore", str(tmp_path / "backup"))
    assert not_empty.returncode == 1 and "state dir is not empty" in not_empty.stderr
    (tmp_path / "backup" / "state" / "spool" / queue_id).unlink()  # a damaged backup
    forced = server.cli("restore", "--force", str(tmp_path / "backup"))
    assert forced.returncode == 1
    assert f"maildetour: {queue_id}: copies to deliver, but no spool file" in forced.stderr
    assert not (server.state / "spool" / queue_id).exists()


def test_files_the_config_names_outside_the_state_dir_are_put_back_where_missing(tmp_path: Path) -> None:
    secret = tmp_path / "etc" / "srs-secret"
    secret.parent.mkdir()
    secret.write_text("c2VjcmV0IHNlY3JldCBzZWNyZXQ=\n")
    server = second_server(tmp_path / "a", "127.0.0.2:9")
    server.config.write_text(server.config.read_text() + f'\n[srs]\nsecret_file = "{secret}"\n')
    made = cli("backup", "--config", str(server.config), str(tmp_path / "backup"))
    assert made.returncode == 0, made.stderr
    assert "no queue yet" in made.stdout and str(secret) in made.stdout
    assert (tmp_path / "backup" / "files" / str(secret).lstrip("/")).read_text() == secret.read_text()
    secret.unlink()
    restored = cli("restore", "--config", str(server.config), str(tmp_path / "backup"))
    assert restored.returncode == 0, restored.stderr
    assert f"wrote {secret}" in restored.stdout and secret.read_text().startswith("c2VjcmV0")
    assert json.loads((tmp_path / "backup" / "manifest.json").read_text())["schema"] is None
