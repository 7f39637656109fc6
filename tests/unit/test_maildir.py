"""Maildir delivery with fsyncs, and the listing/reading/removal POP3 uses. Issue 3."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from maildetour.mailbox import maildir
from maildetour.mailbox.maildir import (
    MaildirMessage,
    WireSizeCounter,
    deliver,
    deliver_many,
    list_messages,
    open_message,
    remove,
    uid_for,
    wire_size,
)


def read(root: Path, message: MaildirMessage) -> bytes:
    handle = open_message(root, message)
    assert handle is not None
    with handle:
        return handle.read()


def test_deliver_creates_private_maildir_and_stores_exact_bytes(tmp_path: Path) -> None:
    root = tmp_path / "mailboxes" / "box@example.test"
    data = b"Subject: hi\r\n\r\nbody\r\n"
    name = deliver(root, data)
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((root / sub).stat().st_mode) == 0o700
    path = root / "new" / name
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(root / "tmp") == []
    assert f",S={len(data)}," in name and ":" not in name and "/" not in name


def test_each_delivery_gets_its_own_name(tmp_path: Path) -> None:
    names = {deliver(tmp_path / "m", b"x\n") for _ in range(50)}
    assert len(names) == 50


def test_deliver_fails_with_oserror_when_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError):
        deliver(tmp_path / "file" / "box", b"x\n")


class FsyncSpy:
    """Records the path of every fsync'ed descriptor once `start`ed (os.fsync still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.synced: list[str] = []
        self._monkeypatch, self._real = monkeypatch, os.fsync

    def start(self) -> None:
        self._monkeypatch.setattr(os, "fsync", self._spy)

    def _spy(self, fd: int) -> None:
        self.synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        self._real(fd)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> FsyncSpy:
    return FsyncSpy(monkeypatch)


def test_deliver_fsyncs_the_file_and_the_new_directory(tmp_path: Path, fsyncs: FsyncSpy) -> None:
    root = tmp_path / "m"
    deliver(root, b"first\n")
    fsyncs.start()
    name = deliver(root, b"second\n")
    assert fsyncs.synced == [str(root / "tmp" / name), str(root / "new")]


def test_a_group_fsyncs_each_file_and_each_new_directory_once(tmp_path: Path, fsyncs: FsyncSpy) -> None:
    """deliver_many: three messages, two Maildirs: three file fsyncs, then one per `new/`."""
    a, b = tmp_path / "a", tmp_path / "b"
    deliver(a, b"warm\n")
    deliver(b, b"warm\n")
    fsyncs.start()
    names = deliver_many([(a, b"one\n"), (b, b"two\n"), (a, b"three\n")])
    assert all(isinstance(n, str) for n in names)
    files = [str(a / "tmp" / names[0]), str(b / "tmp" / names[1]), str(a / "tmp" / names[2])]  # type: ignore[operator]
    assert fsyncs.synced == [*files, str(a / "new"), str(b / "new")]
    assert [(a / "new" / names[0]).read_bytes(), (b / "new" / names[1]).read_bytes(),  # type: ignore[operator]
            (a / "new" / names[2]).read_bytes()] == [b"one\n", b"two\n", b"three\n"]  # type: ignore[operator]


def test_a_group_reports_each_messages_own_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One message that cannot be written fails alone; a `new/` whose fsync fails fails every
    message renamed into it (none of them is durable), and only those."""
    (tmp_path / "file").write_text("not a directory")
    good, bad_dir = tmp_path / "good", tmp_path / "flaky"
    results = deliver_many([(good, b"1\n"), (tmp_path / "file" / "box", b"2\n"), (good, b"3\n")])
    assert isinstance(results[0], str) and isinstance(results[2], str) and isinstance(results[1], OSError)

    real = maildir.fsync_dir

    def failing(path: Path) -> None:
        if path == bad_dir / "new":
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(maildir, "fsync_dir", failing)
    results = deliver_many([(bad_dir, b"a\n"), (good, b"b\n"), (bad_dir, b"c\n")])
    assert isinstance(results[0], OSError) and isinstance(results[2], OSError)
    assert isinstance(results[1], str)


def test_wire_size_counts_crlf_line_ends() -> None:
    assert wire_size(b"a\r\nb\r\n") == 6
    assert wire_size(b"a\nb\n") == 6
    assert wire_size(b"a\nb") == 6          # an unterminated last line gets CRLF
    assert wire_size(b"") == 0
    counter = WireSizeCounter()
    for piece in (b"a\r", b"\nb\n"):        # CRLF split across chunks is one line end
        counter.feed(piece)
    assert counter.total() == wire_size(b"a\r\nb\n") == 6


def test_listing_reads_sizes_from_names_oldest_first(tmp_path: Path) -> None:
    root = tmp_path / "m"
    first = deliver(root, b"Subject: 1\n\nLF only\n")
    os.utime(root / "new" / first, ns=(1_000_000_000, 1_000_000_000))
    second = deliver(root, b"Subject: 2\r\n\r\nCRLF\r\n")
    listed = list_messages(root)
    assert [m.name for m in listed] == [first, second]
    assert [m.size for m in listed] == [wire_size(b"Subject: 1\n\nLF only\n"), 20]
    assert [m.uid for m in listed] == [first, second]


def test_listing_counts_files_delivered_by_others_and_skips_junk(tmp_path: Path) -> None:
    root = tmp_path / "m"
    deliver(root, b"ours\n")
    (root / "cur" / "1700000000.foreign.host:2,S").write_bytes(b"a\nb\n")
    (root / "cur" / ".hidden").write_bytes(b"x")
    (root / "new" / "subdir").mkdir()
    (root / "tmp" / "in-progress").write_bytes(b"x")
    listed = {m.name: m for m in list_messages(root)}
    assert set(listed) - {n for n in listed if n.endswith(",W=6")} == {
        "1700000000.foreign.host:2,S"}
    assert listed["1700000000.foreign.host:2,S"].size == 6
    assert listed["1700000000.foreign.host:2,S"].uid == "1700000000.foreign.host"


def test_missing_maildir_lists_empty(tmp_path: Path) -> None:
    assert list_messages(tmp_path / "never-delivered") == []


def test_uid_survives_imap_flags_and_is_a_valid_uidl() -> None:
    assert uid_for("123.M1P2R3.host,S=5,W=6") == uid_for("123.M1P2R3.host,S=5,W=6:2,RS")
    long = uid_for("x" * 100)
    odd = uid_for("name with spaces")
    for uid in (long, odd):
        assert 1 <= len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid)
    assert uid_for("x" * 100) == long != uid_for("x" * 101)


def test_open_follows_a_message_moved_to_cur_with_flags(tmp_path: Path) -> None:
    root = tmp_path / "m"
    name = deliver(root, b"moved\n")
    [listed] = list_messages(root)
    os.rename(root / "new" / name, root / "cur" / (name + ":2,S"))
    assert read(root, listed) == b"moved\n"
    os.unlink(root / "cur" / (name + ":2,S"))
    assert open_message(root, listed) is None


def test_remove_deletes_listed_messages_even_after_a_rename(tmp_path: Path) -> None:
    root = tmp_path / "m"
    keep = deliver(root, b"keep\n")
    deliver(root, b"go 1\n")
    moved = deliver(root, b"go 2\n")
    listed = [m for m in list_messages(root) if m.name != keep]
    os.rename(root / "new" / moved, root / "cur" / (moved + ":2,S"))
    assert remove(root, listed) == 0
    assert [m.name for m in list_messages(root)] == [keep]
    assert remove(root, listed) == 0  # already gone is not an error


def test_large_mailbox_lists_without_reading_bodies(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "m"
    for i in range(3):
        deliver(root, b"Subject: %d\n\nbody\n" % i)
    # The bulk copies deliver()'s naming scheme instead of fsyncing 10,000 times.
    sample = list_messages(root)[0].name
    stem, sizes = sample.split(",", 1)
    for i in range(3, 10_000):
        (root / "new" / f"{stem}{i},{sizes}").write_bytes(b"Subject: x\n\nbody\n")
    opened: list[str] = []
    real_open = open

    def spy(file: object, *args: object, **kwargs: object) -> object:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", spy)
    listed = list_messages(root)
    assert len(listed) == 10_000 and len({m.uid for m in listed}) == 10_000
    assert opened == []
