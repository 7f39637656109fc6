"""Durable directories (issue 10, #13) and the state dir lock (issue 10, #11)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from maildetour.durable import make_dirs
from maildetour.mailbox.maildir import deliver
from maildetour.statelock import LOCK_FILE, StateDirBusy, hold_state_dir
from maildetour.store.spool import Spool


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path fsync'ed from now on, in order."""
    paths: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return paths


def test_make_dirs_fsyncs_the_parent_of_every_directory_it_makes(tmp_path: Path, synced: list[str]) -> None:
    """Issue 10, #13: mkdir(parents=True) alone leaves the new names in page cache only."""
    leaf = tmp_path / "state" / "mailboxes" / "box@example.test"
    make_dirs(leaf)
    for path in (tmp_path / "state", tmp_path / "state" / "mailboxes", leaf):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert {str(tmp_path), str(tmp_path / "state"), str(tmp_path / "state" / "mailboxes")} <= set(synced)
    assert str(leaf) not in synced  # nothing in it yet: only its name matters


def test_make_dirs_costs_nothing_the_second_time_and_makes_a_removed_directory_again(
        tmp_path: Path, synced: list[str]) -> None:
    leaf = tmp_path / "a" / "b"
    make_dirs(leaf)
    synced.clear()
    make_dirs(leaf)
    assert synced == []
    leaf.rmdir()
    make_dirs(leaf)
    assert leaf.is_dir() and synced == [str(tmp_path / "a")]


def test_make_dirs_confirms_a_directory_someone_else_made(tmp_path: Path, synced: list[str]) -> None:
    """A directory made by another process (or by a run that crashed before its fsync) is not
    known to be durable: its parent is fsync'ed once before we rely on it."""
    (tmp_path / "other").mkdir()
    make_dirs(tmp_path / "other")
    assert str(tmp_path) in synced


def test_make_dirs_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        make_dirs(tmp_path / "file" / "box")
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "file")


def test_a_first_delivery_makes_mailboxes_durable_in_the_state_dir(tmp_path: Path, synced: list[str]) -> None:
    """Issue 10, #13: `ensure_maildir` fsynced the mailbox's parent but never the state dir,
    so the name `mailboxes` itself could vanish in a power cut."""
    state = tmp_path / "state"
    make_dirs(state)
    synced.clear()
    name = deliver(state / "mailboxes" / "box@example.test", b"x\n")
    box = state / "mailboxes" / "box@example.test"
    assert set(synced) == {str(state), str(state / "mailboxes"), str(box), str(box / "tmp" / name),
                           str(box / "new")}
    assert synced[-2:] == [str(box / "tmp" / name), str(box / "new")]  # the message after its folders


def test_a_new_spool_is_durable_in_the_state_dir(tmp_path: Path, synced: list[str]) -> None:
    """Issue 10, #13: the spool's directories were made without fsyncing their parents."""
    state = tmp_path / "state"
    make_dirs(state)
    synced.clear()
    Spool(state / "spool")
    assert set(synced) == {str(state), str(state / "spool")}


def test_a_second_holder_of_the_state_dir_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    """Issue 10, #11: one server per state dir."""
    state = tmp_path / "new" / "state"
    with hold_state_dir(state):
        assert (state / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(StateDirBusy) as busy, hold_state_dir(state):
            pass
        assert busy.value.pid == os.getpid()
        assert busy.value.filename == str(state)
        assert busy.value.strerror == f"state dir in use by another maildetour serve (pid {os.getpid()})"
    with hold_state_dir(state):  # released at the end of the block
        pass
