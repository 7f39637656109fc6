"""store.audit: one JSON line per event, ISO 8601 times, and a new file after rotation."""

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

from maildetour.store.audit import AuditLog
from maildetour.store.records import Event


def event(queue_id: str) -> Event:
    return Event(1795440356.789012, queue_id, 6, "detoured", "ituki@gm.example.net", "from x: refused")


def test_each_event_is_a_json_line_with_an_iso_time(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.write([event("Q1"), event("Q2")])
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [line["queue_id"] for line in lines] == ["Q1", "Q2"]
    assert lines[0]["time"] == datetime.fromtimestamp(1795440356.789012, timezone.utc).isoformat()
    assert lines[0]["time"].endswith(".789012+00:00")
    assert lines[0] == {"time": lines[0]["time"], "queue_id": "Q1", "copy": 6, "event": "detoured",
                        "target": "ituki@gm.example.net", "detail": "from x: refused"}


def test_a_rotated_log_is_followed_by_a_new_file(tmp_path: Path) -> None:
    """Issue 11: audit.jsonl survives log rotation (logrotate moves it, or removes it)."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.write([event("Q1")])
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate's default: move, then the writer goes on
    log.write([event("Q2")])
    log.reopen()  # SIGHUP (a postrotate script): the same file again, nothing lost
    log.write([event("Q3")])
    log.close()
    assert [json.loads(l)["queue_id"] for l in (tmp_path / "audit.jsonl.1").read_text().splitlines()] == ["Q1"]
    assert [json.loads(l)["queue_id"] for l in path.read_text().splitlines()] == ["Q2", "Q3"]


def test_reopen_from_another_thread_during_writes_loses_no_line(tmp_path: Path) -> None:
    """The CI run found it: SIGHUP's reopen (event loop thread) closed the file while the
    store's writer thread wrote to it, and the server died. Every line is in one of the files."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    events = [Event(1_800_000_000.0, f"Q{n}", n, "delivered", "a@example.com", "") for n in range(2000)]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for event in events:
                audit.write([event])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    reopened = 0
    while thread.is_alive():
        (tmp_path / "audit.jsonl").rename(tmp_path / f"audit.jsonl.{reopened}")
        audit.reopen()
        reopened += 1
    thread.join()
    audit.close()
    assert errors == [] and reopened > 1
    lines = [line for f in tmp_path.iterdir() for line in f.read_text().splitlines()]
    assert sorted(json.loads(line)["queue_id"] for line in lines) == sorted(f"Q{n}" for n in range(2000))


def test_a_new_file_that_cannot_be_opened_leaves_the_old_one_in_use(tmp_path: Path) -> None:
    """The review found that SIGHUP after logrotate made the new file unreadable for us closed
    the old file first and left the audit log dead (and the reload raised)."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.write([Event(1_800_000_000.0, "Q1", 1, "delivered", "a@example.com", "")])
    (tmp_path / "audit.jsonl").rename(tmp_path / "audit.jsonl.1")
    (tmp_path / "audit.jsonl").mkdir()  # in the way: the new file cannot be opened
    try:
        audit.reopen()
    except OSError:
        pass
    else:
        raise AssertionError("reopen should have failed")
    (tmp_path / "audit.jsonl").rmdir()
    (tmp_path / "audit.jsonl").touch()  # then made right (logrotate's `create`, fixed)
    audit.write([Event(1_800_000_001.0, "Q2", 2, "delivered", "a@example.com", "")])  # reopens now
    audit.close()
    assert "Q1" in (tmp_path / "audit.jsonl.1").read_text()
    assert "Q2" in (tmp_path / "audit.jsonl").read_text()
