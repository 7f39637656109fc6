"""What each directory maker leaves after a power cut (issue 10, #13), one part at a time, on
the FUSE layer that keeps only what was made durable (`tests.peers.powercut`). The whole
server under power cuts: `test_power_loss`."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from maildetour.durable import make_dirs
from maildetour.mailbox.maildir import deliver, list_messages
from maildetour.store.spool import Spool
from maildetour.store.sqlite import SqliteStore
from tests.peers.powercut import power_layer

pytestmark = pytest.mark.peer("fuse")


def test_make_dirs_survives_a_power_cut(tmp_path: Path) -> None:
    """Issue 10, #13: every directory made, and its missing ancestors, are still there."""
    with power_layer(tmp_path) as layer:
        make_dirs(layer.mount / "var" / "a" / "b", layer.mount / "var" / "c")
        survived = layer.cut()
    assert (survived / "var" / "a" / "b").is_dir() and (survived / "var" / "c").is_dir()


def test_a_message_delivered_into_a_new_mailbox_survives_a_power_cut(tmp_path: Path) -> None:
    """Issue 10, #13: before, `mailboxes/` was never fsync'ed into the state dir, and the cut
    took the mailbox and its acknowledged message with it."""
    with power_layer(tmp_path, prepare={"var": None}) as layer:
        deliver(layer.mount / "var" / "mailboxes" / "box@example.test", b"Subject: kept\r\n\r\nx\r\n")
        survived = layer.cut()
    [kept] = list_messages(survived / "var" / "mailboxes" / "box@example.test")
    assert (survived / "var" / "mailboxes" / "box@example.test" / kept.subdir / kept.name).read_bytes() \
        == b"Subject: kept\r\n\r\nx\r\n"


def test_a_spooled_message_in_a_new_spool_survives_a_power_cut(tmp_path: Path) -> None:
    """Issue 10, #13: the spool's own directory is durable before its first message is."""
    with power_layer(tmp_path, prepare={"var": None}) as layer:
        spool = Spool(layer.mount / "var" / "spool")
        spool.write("QUEUEID1", b"bytes")
        spool.sync()
        survived = layer.cut()
    assert (survived / "var" / "spool" / "QUEUEID1").read_bytes() == b"bytes"
    assert (survived / "var" / "spool" / "tmp").is_dir()


def test_a_queue_in_a_new_directory_survives_a_power_cut(tmp_path: Path) -> None:
    """Issue 10, #13: the queue database's directory is made durably before the database."""
    with power_layer(tmp_path, prepare={"var": None}) as layer:
        state = layer.mount / "var" / "queue"
        store = SqliteStore(state / "queue.sqlite3", state / "spool", state / "audit.jsonl")
        store.close()
        survived = layer.cut()
    conn = sqlite3.connect(survived / "var" / "queue" / "queue.sqlite3")
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()
    assert {"messages", "copies", "events"} <= tables
