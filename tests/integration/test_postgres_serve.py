"""Issue 14, `maildetour serve` on a PostgreSQL store (a real PostgreSQL from Debian's package on
loopback): mail in by SMTP, every copy delivered to a sink, `queue` and `trace` reading the
same database; the database stopped during DATA answers 451 4.3.0 (never 250) and the node
carries on by itself once it is back."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Server, message, running_server
from tests.peers.postgres import PostgresPeer, running_postgres
from tests.peers.sinks import Sink, running_sink

TARGETS = ("ituki-ex@gmail.com", "ituki@other.example")


SHARED_SECRET = Path(__file__).parent.parent / "fixtures" / "srs-nodes.secret"


def node_config(url: str, sink: Sink, *, node: str, lease: str = "3s", extra: str = "") -> str:
    """A node of a shared store: no local mailbox (a node keeps none), both targets by SMTP to
    `sink`, the SRS secret every node shares. ({smtp_port} is filled in by `running_server`.)"""
    return f"""
[srs]
secret_file = "{SHARED_SECRET}"

[server]
hostname = "mx.example.com"
state_dir = "var"
node = "{node}"

[smtp]
listen = ["127.0.0.1:{{smtp_port}}"]
domains = ["example.com"]

[delivery]
dns_servers = ["127.0.0.1:9"]

[delivery.relay]
"gmail.com" = "127.0.0.1:{sink.port}"
"other.example" = "127.0.0.1:{sink.port}"

[forward."ituki@example.com"]
to = {list(TARGETS)!r}

[store]
url = "{url}"
lease = "{lease}"
{extra}
""".replace("'", '"')


def delivered(sink: Sink) -> dict[tuple[str, str], int]:
    """(Subject, recipient) -> how many times the sink received it."""
    counts: dict[tuple[str, str], int] = {}
    for m in sink.messages:
        subject = next((line.split(b":", 1)[1].strip().decode() for line in m.data.split(b"\r\n")
                        if line.lower().startswith(b"subject:")), "")
        for rcpt in m.rcpt_tos:
            counts[(subject, rcpt)] = counts.get((subject, rcpt), 0) + 1
    return counts


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresPeer]:
    with running_postgres() as peer:
        yield peer


def test_serve_on_postgresql_delivers_every_copy_and_queue_and_trace_read_it(postgres: PostgresPeer,
                                                                              tmp_path: Path) -> None:
    url = postgres.new_database()
    with running_sink() as sink, running_server(tmp_path, node_config(url, sink, node="one")) as server:
        ids = [server.send(message(f"pg {i}")) for i in range(5)]
        sink.wait_for(10, timeout=30)
        assert delivered(sink) == {(f"pg {i}", t): 1 for i in range(5) for t in TARGETS}
        database = url.rsplit("/", 1)[1]
        deadline = time.monotonic() + 10
        while postgres.psql("SELECT count(*) FROM copies WHERE state = 'delivered'", database) != "10":
            assert time.monotonic() < deadline, postgres.psql("SELECT state, count(*) FROM copies GROUP BY 1",
                                                              database)
            time.sleep(0.1)
        trace = server.cli("trace", ids[0])
        assert trace.returncode == 0, trace.stderr
        assert "delivered" in trace.stdout and ids[0] in trace.stdout
        listed = server.cli("queue", "list")
        assert listed.returncode in (0, 1), listed.stderr  # nothing queued now
        assert not (server.state / "queue.sqlite3").exists()  # the queue is the database's alone


def test_the_database_down_during_data_is_451_and_the_node_recovers_by_itself(tmp_path: Path) -> None:
    with running_postgres() as peer, running_sink() as sink, \
            running_server(tmp_path, node_config(peer.url(), sink, node="one")) as server:
        server.send(message("before"))
        sink.wait_for(2, timeout=30)
        with server.smtp() as client:
            client.mail("alice@sender.example")
            assert client.rcpt("ituki@example.com")[0] == 250
            peer.stop("immediate")  # the database goes away during the transaction
            code, text = client.data(message("during"))
        assert (code, text.split()[0]) == (451, b"4.3.0"), (code, text)
        peer.start()
        deadline = time.monotonic() + 30
        while True:  # a sender's retry; the node was not restarted
            try:
                server.send(message("after"))
                break
            except (AssertionError, smtplib.SMTPException) as exc:
                assert time.monotonic() < deadline, f"not accepting again: {exc}\n{server.log()}"
                time.sleep(0.5)
        sink.wait_for(4, timeout=30)
        counts = delivered(sink)
        assert {s for s, _ in counts} == {"before", "after"} and set(counts.values()) == {1}


def _kill_under_load(postgres: PostgresPeer, tmp_path: Path, total: int) -> tuple[int, int, int, int]:
    """Two nodes on one database, `total` messages sent to them in turn; node A is killed with
    SIGKILL halfway; a send that fails goes to the other node (two MX hosts). Returns
    (acknowledged, lost copies, duplicated copies, sends refused or cut by the dead node)."""
    import threading

    url = postgres.new_database()
    acked: list[str] = []
    refused = 0
    with running_sink(delay=0.05) as sink, \
            running_server(tmp_path / "a", node_config(url, sink, node="a")) as a, \
            running_server(tmp_path / "b", node_config(url, sink, node="b")) as b:
        lock = threading.Lock()

        def send(first: Server, other: Server, subject: str) -> None:
            """As a sending MTA does with two MX hosts: the other one when the first fails."""
            nonlocal refused
            for server in (first, other):
                try:
                    server.send(message(subject))
                except (AssertionError, OSError, smtplib.SMTPException):
                    with lock:
                        refused += 1
                    continue
                with lock:
                    acked.append(subject)
                return

        def sender(start: int) -> None:
            for i in range(start, total, 4):
                send(*((a, b) if i % 2 else (b, a)), f"load {i}")

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        while len(acked) < total // 2:
            time.sleep(0.01)
        a.kill()
        for t in threads:
            t.join()
        wanted = {(s, t) for s in acked for t in TARGETS}
        deadline = time.monotonic() + 60
        while not wanted <= set(delivered(sink)) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # late duplicates
        counts = delivered(sink)
        lost = len(wanted - set(counts))
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        if lost:
            raise AssertionError(f"{lost} copies lost of {len(wanted)} ({duplicates} duplicated)\n{b.log()[-3000:]}")
    return len(acked), lost, duplicates, refused


def test_a_node_killed_under_load_loses_nothing_the_other_delivers_its_mail(postgres: PostgresPeer,
                                                                           tmp_path: Path) -> None:
    acknowledged, lost, duplicates, refused = _kill_under_load(postgres, tmp_path, 200)
    print(f"\nkill test: {acknowledged} acknowledged, {refused} refused, lost {lost}, duplicated {duplicates}")
    assert acknowledged == 200  # every message got a 250 from one node or the other
    assert lost == 0
