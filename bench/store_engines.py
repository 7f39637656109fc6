"""Delivered copies a second of `maildetour serve` on SQLite, on PostgreSQL, and of two nodes
on one PostgreSQL (issue 14).

What it does: one sink (aiosmtpd, loopback) plays both forward targets; N messages, each
forwarded to two SMTP targets, are sent by C concurrent smtplib clients (spread over the nodes);
the figure is delivered copies / seconds from the first send to the last copy at the sink.
PostgreSQL is a private server from Debian's package (tests.peers.postgres: initdb/pg_ctl on
loopback in a temporary directory, fsync on, synchronous_commit on). Both engines commit
durably before each 250. Test-peer helpers are reused from tests/ (run from the repo root).

Usage: python3 -m bench.store_engines [--messages N] [--clients C]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from tests.harness import Server, message, running_server
from tests.integration.test_postgres_serve import node_config
from tests.peers.postgres import running_postgres
from tests.peers.sinks import Sink, running_sink

SQLITE_CONFIG = """
[server]
hostname = "mx.example.com"
state_dir = "var"
workers = 1

[smtp]
listen = ["127.0.0.1:{{smtp_port}}"]
domains = ["example.com"]

[delivery]
dns_servers = ["127.0.0.1:9"]

[delivery.relay]
"gmail.com" = "127.0.0.1:{port}"
"other.example" = "127.0.0.1:{port}"

[forward."ituki@example.com"]
to = ["ituki-ex@gmail.com", "ituki@other.example"]
"""


def load(nodes: list[Server], sink: Sink, messages: int, clients: int) -> tuple[float, float]:
    """Send and wait for every copy; (delivered copies a second, accepted messages a second)."""
    start = time.monotonic()
    sent_at: list[float] = []

    def sender(k: int) -> None:
        for i in range(k, messages, clients):
            nodes[i % len(nodes)].send(message(f"bench {i}"))
        sent_at.append(time.monotonic())

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.wait_for(2 * messages, timeout=600)
    took = time.monotonic() - start
    return 2 * messages / took, messages / (max(sent_at) - start)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.store_engines")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="md-bench-") as tmp:
        base = Path(tmp)
        with running_sink() as sink, running_server(base / "sqlite", SQLITE_CONFIG.format(port=sink.port)) as one:
            results["sqlite, 1 node"] = load([one], sink, args.messages, args.clients)
        with running_postgres() as pg:
            with running_sink() as sink, \
                    running_server(base / "pg1", node_config(pg.new_database(), sink, node="a", lease="60s")) as a:
                results["postgresql, 1 node"] = load([a], sink, args.messages, args.clients)
            url = pg.new_database()
            with running_sink() as sink, running_server(base / "pg2a", node_config(url, sink, node="a")) as a, \
                    running_server(base / "pg2b", node_config(url, sink, node="b")) as b:
                results["postgresql, 2 nodes"] = load([a, b], sink, args.messages, args.clients)
    print(f"{args.messages} messages x 2 copies, {args.clients} clients")
    for name, (delivered, accepted) in results.items():
        print(f"{name:22} {delivered:8.1f} delivered copies/s   {accepted:8.1f} accepted messages/s")


if __name__ == "__main__":
    main()
