"""SMTP intake workers (issue 13, "use every core"), run as an operator runs them: `maildetour
serve` with `[server] workers = N` binds the SMTP port and starts N - 1 worker processes that
accept on it. Real sockets, real processes, real signals: every message that got its 250 is
delivered exactly once, a worker killed with SIGKILL under load loses nothing and is replaced,
a reload replaces the workers without dropping a session, a stop is clean."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.harness import Server, message, seed_text
from tests.peers.ports import free_port

BOX = "ituki@pc.example.net"  # a local mailbox: one copy per message, delivered in-process
STARTED = re.compile(r"intake worker (\d+) started \(pid (\d+)\)")


def config_text(smtp_port: int, workers: int, smtp_extra: str = "") -> str:
    text = seed_text(smtp_port=smtp_port, pop3_port=None, gmail="127.0.0.2:9")
    text = text.replace('state_dir = "var"', f'state_dir = "var"\nworkers = {workers}', 1)
    return text.replace("[smtp]\n", f"[smtp]\n{smtp_extra}", 1)


@contextmanager
def server_with(directory: Path, workers: int, smtp_extra: str = "") -> Iterator[Server]:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = directory / "maildetour.toml"
    config.write_text(config_text(port, workers, smtp_extra), encoding="utf-8")
    server = Server(directory, config, port, None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def worker_pids(server: Server) -> dict[int, int]:
    """Index -> pid of the workers started last (by the log)."""
    return {int(index): int(pid) for index, pid in STARTED.findall(server.log())}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for(what: str, check: object, server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s\n{server.log()[-4000:]}")


def subjects(server: Server) -> Counter[str]:
    found: Counter[str] = Counter()
    for data in server.mailbox(BOX):
        match = re.search(rb"^Subject: (.*?)\r?$", data, re.M)
        assert match is not None
        found[match.group(1).decode()] += 1
    return found


def send_many(server: Server, names: list[str], accepted: list[str], refused: list[str]) -> None:
    """Send each message in its own session; note which got 250 and which did not."""
    for name in names:
        try:
            with smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="client.test", timeout=30) as client:
                client.sendmail("alice@sender.example", [BOX], message(name))
            accepted.append(name)
        except (smtplib.SMTPException, OSError):
            refused.append(name)  # no 250: the client keeps the message and tries again later


def test_workers_accept_and_every_copy_is_delivered_once(tmp_path: Path) -> None:
    with server_with(tmp_path, workers=3) as server:
        assert "SMTP received by 2 intake workers" in server.log()
        assert len(worker_pids(server)) == 2
        accepted: list[str] = []
        refused: list[str] = []
        threads = [threading.Thread(target=send_many, args=(server, [f"m{t}-{i}" for i in range(15)],
                                                              accepted, refused)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert refused == [] and len(accepted) == 60
        server.wait_mailbox(BOX, 60)
        time.sleep(0.5)  # a duplicate would come now
        assert subjects(server) == Counter({name: 1 for name in accepted})
        assert "[intake1]" in server.log() or "[intake2]" in server.log()


def test_a_worker_killed_under_load_loses_nothing_and_is_replaced(tmp_path: Path) -> None:
    with server_with(tmp_path, workers=3) as server:
        pids = worker_pids(server)
        victim_index, victim = min(pids.items())
        accepted: list[str] = []
        refused: list[str] = []
        threads = [threading.Thread(target=send_many, args=(server, [f"k{t}-{i}" for i in range(50)],
                                                              accepted, refused)) for t in range(4)]
        for thread in threads:
            thread.start()
        wait_for("40 messages accepted", lambda: len(accepted) >= 40, server)
        os.kill(victim, signal.SIGKILL)
        for thread in threads:
            thread.join()
        assert len(accepted) + len(refused) == 200
        # The replacement: the same index, a new pid, serving.
        wait_for("a replacement worker", lambda: worker_pids(server).get(victim_index, victim) != victim, server)
        assert f"intake worker {victim_index} (pid {victim}) ended (signal SIGKILL); starting another" in server.log()
        # Every 250 is delivered (the main process committed and scheduled it), and none twice.
        server.wait_mailbox(BOX, len(accepted), timeout=60)
        time.sleep(0.5)
        got = subjects(server)
        lost = [name for name in accepted if name not in got]
        duplicated = {name: n for name, n in got.items() if n > 1}
        assert lost == [] and duplicated == {}, (lost, duplicated, len(refused))
        # Messages a client saw fail may still have been committed (the 250 lost with the
        # worker): delivered once at most, never twice.
        assert set(got) <= set(accepted) | set(refused)
        replacement = worker_pids(server)[victim_index]
        wait_for("the replacement serves", lambda: "intake worker serving (pid %d" % replacement in server.log(),
                 server)
        server.send(message("after the kill"), to=(BOX,))
        server.wait_mailbox(BOX, len(got) + 1)


def test_a_reload_replaces_the_workers_without_dropping_a_session(tmp_path: Path) -> None:
    with server_with(tmp_path, workers=2) as server:
        [old] = worker_pids(server).values()
        open_session = smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="client.test", timeout=30)
        open_session.ehlo()
        assert open_session.mail("alice@sender.example")[0] == 250
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for("new workers", lambda: len(STARTED.findall(server.log())) == 2, server)
        [new] = worker_pids(server).values()
        assert new != old
        wait_for("the reload", lambda: "config reloaded" in server.log(), server)
        # The old worker retires: no new connection, but the open session goes on.
        assert alive(old)
        assert open_session.rcpt(BOX)[0] == 250
        code, _ = open_session.data(message("across the reload"))
        assert code == 250
        server.send(message("after the reload"), to=(BOX,))
        open_session.quit()
        wait_for("the old worker ends", lambda: f"intake worker 1 (pid {old}) ended (exit code 0)" in server.log(),
                 server)
        server.wait_mailbox(BOX, 2)
        assert subjects(server) == Counter({"across the reload": 1, "after the reload": 1})
        assert "starting another" not in server.log()


def test_stop_ends_the_workers_cleanly(tmp_path: Path) -> None:
    with server_with(tmp_path, workers=3) as server:
        pids = list(worker_pids(server).values())
        server.send(message("before the stop"), to=(BOX,))
        server.wait_mailbox(BOX, 1)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
    assert not any(alive(pid) for pid in pids)
    log = server.log()
    for pid in pids:
        assert f"(pid {pid}) ended (exit code 0)" in log
    assert "Traceback" not in log and " ERROR " not in log
    assert not (server.state / "maildetour.pid").exists()


def test_a_worker_that_cannot_read_its_config_says_one_line_and_is_retried(tmp_path: Path) -> None:
    """The config file broken after the start (the main process keeps its config until a
    reload): a worker started now fails with one line naming the key; the main process tries
    again, waiting longer each time, and the next start after the repair serves."""
    with server_with(tmp_path, workers=2) as server:
        [first] = worker_pids(server).values()
        good = server.config.read_text()
        server.config.write_text(good.replace("[smtp]\n", "[smtp]\nlisten_typo = 1\n", 1))
        os.kill(first, signal.SIGKILL)
        wait_for("a failed start", lambda: server.log().count("intake worker stopped:") >= 1, server)
        failure = next(line for line in server.log().splitlines() if "intake worker stopped:" in line)
        assert "smtp.listen_typo: unknown key" in failure
        wait_for("a second try", lambda: "ended (exit code 1); starting another in" in server.log(), server)
        server.config.write_text(good)
        wait_for("a worker serving again", lambda: server.log().count("intake worker serving") >= 2, server, 60)
        server.send(message("after the repair"), to=(BOX,))
        server.wait_mailbox(BOX, 1)
        assert "Traceback" not in server.log()


def test_a_worker_run_by_hand_with_a_bad_config_says_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nworkerz = 2\n')
    done = subprocess.run([sys.executable, "-m", "maildetour.intake_worker", "--config", str(config), "--index", "1",
                           "--parent", str(os.getpid()), "--channel", "0"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.workerz: unknown key" in lines[0], done.stderr


def test_per_client_limit_holds_with_one_intake_worker(tmp_path: Path) -> None:
    """Each process counts its own sessions (docs/configuration.md, `workers`): with one intake
    worker (workers = 2) the per-client limit is exact."""
    with server_with(tmp_path, workers=2, smtp_extra="max_sessions_per_client = 2\nunlimited_clients = []\n") as server:
        first, second = server.smtp(), server.smtp()
        try:
            third = smtplib.SMTP(timeout=30)
            code, text = third.connect("127.0.0.1", server.smtp_port)
            assert code == 421, (code, text)
        finally:
            first.quit()
            second.quit()


def test_one_process_when_workers_is_1(tmp_path: Path) -> None:
    with server_with(tmp_path, workers=1) as server:
        server.send(message("one process"), to=(BOX,))
        server.wait_mailbox(BOX, 1)
        assert "one process" in server.log() and "intake worker" not in server.log()
