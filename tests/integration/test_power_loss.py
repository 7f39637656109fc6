"""Power cuts: every acknowledged message survives, on a filesystem that keeps only what was
made durable (issue 10, #13).

The real `maildetour serve` runs with its state_dir on `tests.peers.powercut`, a FUSE layer that
drops, at the cut, every byte not fsync'ed and every directory entry whose directory was not
fsync'ed afterwards. A cut is: kill -9 the server, unmount the layer (which writes what survived
into a fresh directory), start the server again on that directory. Then every message that got
a 250 must reach its mailbox (it was either still queued, and is delivered now, or delivered
before the cut); duplicates are allowed (at-least-once) and counted.

Run by hand for figures over many random cuts: `python -m tests.integration.test_power_loss 20`.
"""

from __future__ import annotations

import random
import re
import smtplib
import sqlite3
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from maildetour.mailbox.maildir import list_messages, message_path
from tests.harness import Server, message, seed_text
from tests.peers.ports import free_port
from tests.peers.powercut import PowerLayer, power_layer

PC = "ituki@pc.example.net"  # a mailbox that does not exist yet in each run
_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


@dataclass
class Cut:
    acknowledged: set[str]
    delivered_before: int  # messages in the mailbox (as the server saw it) at the cut
    survived: Counter[str]  # Message-ID -> copies in the mailbox after the restart

    @property
    def lost(self) -> set[str]:
        return self.acknowledged - set(self.survived)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.survived.values() if n > 1)

    def __str__(self) -> str:
        return (f"{len(self.acknowledged)} acknowledged, {self.delivered_before} delivered before the cut, "
                f"{len(self.lost)} lost, {self.duplicates} duplicates")


def _server(directory: Path, name: str, state_dir: str) -> Server:
    port = free_port()
    text = seed_text(smtp_port=port, pop3_port=None, gmail="127.0.0.2:9")
    assert 'state_dir = "var"' in text
    config = directory / name
    config.write_text(text.replace('state_dir = "var"', f'state_dir = "{state_dir}"'), encoding="utf-8")
    return Server(directory, config, port, None)


def _mailbox_ids(state: Path) -> Counter[str]:
    root = state / "mailboxes" / PC
    found: Counter[str] = Counter()
    if root.is_dir():
        for entry in list_messages(root):
            match = _MESSAGE_ID.search(message_path(root, entry).read_bytes())
            if match:
                found[match.group(1).decode()] += 1
    return found


def _copies(state: Path) -> Counter[str]:
    """Copies per state in the queue at `state` (empty when there is no queue)."""
    if not (state / "queue.sqlite3").exists():
        return Counter()
    conn = sqlite3.connect(f"file:{state / 'queue.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return Counter(dict(conn.execute("SELECT state, count(*) FROM copies GROUP BY state").fetchall()))
    finally:
        conn.close()


def _power_off(server: Server) -> None:
    """kill -9, if it runs (a server that did not start may still be running)."""
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


def _send(server: Server, tag: str) -> str:
    mail = message(tag, to=PC)
    server.send(mail, to=(PC,))
    return f"{tag.replace(' ', '-')}@sender.example"


def _restart_and_count(directory: Path, layer: PowerLayer, acknowledged: set[str], delivered_before: int) -> Cut:
    survived = layer.cut()
    server = _server(directory, "after.toml", f"{survived.name}/var")
    state = survived / "var"
    try:
        server.start()
        deadline, idle = time.monotonic() + 30, 0
        while time.monotonic() < deadline:
            found = _mailbox_ids(state)
            if acknowledged <= set(found):
                break
            idle = idle + 1 if _copies(state)["queued"] == 0 else 0
            if idle >= 6:  # nothing left to deliver: what is missing now is lost
                break
            time.sleep(0.25)
        return Cut(acknowledged, delivered_before, _mailbox_ids(state))
    finally:
        server.stop()


def cut_after_delivery(directory: Path, *, count: int, fresh_state_dir: bool) -> Cut:
    """Deliver `count` messages into a new mailbox, wait until the queue says all are
    delivered, then cut the power."""
    prepare: dict[str, bytes | None] = {} if fresh_state_dir else {"var": None}
    with power_layer(directory, prepare=prepare) as layer:
        server = _server(directory, "before.toml", f"{layer.mount.name}/var")
        try:
            server.start()
            acknowledged = {_send(server, f"after delivery {i}") for i in range(count)}
            state = layer.mount / "var"
            deadline = time.monotonic() + 30
            while _copies(state)["delivered"] < count:
                assert time.monotonic() < deadline, f"not delivered: {_copies(state)}\n{server.log()}"
                time.sleep(0.1)
            delivered_before = sum(_mailbox_ids(state).values())
        finally:
            _power_off(server)
        return _restart_and_count(directory, layer, acknowledged, delivered_before)


def cut_at_random(directory: Path, rng: random.Random, *, fresh_state_dir: bool = False) -> Cut:
    """Send messages one after another into a new mailbox and cut the power at a random instant
    (0.2 to 2 s after the first 250) while mail is being accepted and delivered."""
    prepare: dict[str, bytes | None] = {} if fresh_state_dir else {"var": None}
    with power_layer(directory, prepare=prepare) as layer:
        server = _server(directory, "before.toml", f"{layer.mount.name}/var")
        acknowledged: list[str] = []
        first = threading.Event()

        def sender() -> None:
            for i in range(10_000):
                try:
                    acknowledged.append(_send(server, f"random cut {i}"))
                except (OSError, smtplib.SMTPException, AssertionError):
                    return  # the power is off
                first.set()

        thread = threading.Thread(target=sender, daemon=True)
        try:
            server.start()
            thread.start()
            assert first.wait(15), server.log()
            time.sleep(rng.uniform(0.2, 2.0))
        finally:
            _power_off(server)
            if thread.is_alive():
                thread.join(30)
        delivered_before = sum(_mailbox_ids(layer.mount / "var").values())
        return _restart_and_count(directory, layer, set(acknowledged), delivered_before)


@pytest.mark.peer("fuse")
@pytest.mark.parametrize("fresh_state_dir", [True, False], ids=["new state_dir", "existing state_dir"])
def test_a_power_cut_after_delivery_into_a_new_mailbox_loses_nothing(tmp_path: Path, fresh_state_dir: bool) -> None:
    """Issue 10, #13: the directories made for a new mailbox (and the state dir, spool and queue
    directories) are fsync'ed into their parents before anything in them is acknowledged, so a
    power cut after delivery keeps every message."""
    cut = cut_after_delivery(tmp_path, count=5, fresh_state_dir=fresh_state_dir)
    print(f"power cut after delivery ({'new' if fresh_state_dir else 'existing'} state_dir): {cut}")
    assert len(cut.acknowledged) == 5 and cut.delivered_before == 5
    assert not cut.lost, f"{cut}: lost {sorted(cut.lost)}"


@pytest.mark.peer("fuse")
def test_power_cuts_at_random_instants_lose_no_acknowledged_message(tmp_path: Path) -> None:
    """Issue 10, #13: cut the power at random instants while mail is accepted and delivered
    into a mailbox that does not exist yet: every acknowledged message survives."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    cuts = [cut_at_random(tmp_path / f"cut{n}", rng) for n in range(3)]
    report = "; ".join(map(str, cuts))
    print(f"power cuts at random instants (seed {seed}): {report}")
    assert all(cut.acknowledged for cut in cuts), report
    assert not any(cut.lost for cut in cuts), f"seed {seed}: {report}"


def main(argv: list[str]) -> int:
    """Figures: `python -m tests.integration.test_power_loss [CUTS] [--fresh]`."""
    import tempfile

    cuts = int(argv[0]) if argv and argv[0].isdigit() else 20
    fresh = "--fresh" in argv
    rng = random.Random(int(time.time()))
    totals = Counter[str]()
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(cuts):
            cut = cut_at_random(Path(tmp) / f"cut{n}", rng, fresh_state_dir=fresh)
            print(f"cut {n + 1}: {cut}", flush=True)
            totals.update(acknowledged=len(cut.acknowledged), lost=len(cut.lost),
                          duplicates=cut.duplicates, cuts_with_loss=int(bool(cut.lost)))
    print(f"{cuts} cuts: {totals['acknowledged']} acknowledged, {totals['lost']} lost "
          f"({totals['cuts_with_loss']} cuts lost something), {totals['duplicates']} duplicates")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
