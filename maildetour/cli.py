"""Command line: argument parsing only; the work is done by `app`, `config` and `report`.

Exit codes: 0 ok, 1 bad input or config (one line naming the key and the reason), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sqlite3
import sys
from pathlib import Path

from maildetour.config import Config, ConfigError, load_config
from maildetour.core.address import AddressError, parse_address
from maildetour.core.password import hash_password
from maildetour.core.routing import RoutingTable, route
from maildetour import report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maildetour", description=(
        "Forward mail at once; detour refused copies instead of bouncing; never reveal hidden addresses."))
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
        return p

    with_config("serve", "run the server").add_argument("--verbose", "-v", action="store_true")
    with_config("check", "validate the config and print the routing table")
    with_config("route", "where mail for ADDRESS goes, and why").add_argument("address")
    with_config("trace", "the story of one message, by queue id or Message-ID").add_argument("id")
    queue = with_config("queue", "list queued and quarantined copies")
    queue.add_argument("--all", action="store_true", help="include finished copies of recent messages")
    queue.add_argument("--flush", action="store_true", help="make every queued copy due now "
                                                            "(tells a running server by SIGUSR1)")
    queue.add_argument("--release", metavar="QUEUE_ID", help="queue a message's quarantined copies "
                                                             "again (to their last target), then flush")
    sub.add_parser("passwd", help="read a password and print its scrypt$ hash for password_hash")
    dkim = sub.add_parser("dkim", help="DKIM key management")
    dkim_sub = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = dkim_sub.add_parser("keygen", help="write the [signing] DKIM key (and SRS secret file if "
                                                "missing) and print the DNS TXT record to publish")
    keygen.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
    keygen.add_argument("--bits", type=int, default=2048)
    demo = sub.add_parser("demo", help="write the seed demo config (if missing) and run it, "
                                       "with a stand-in gmail that refuses the EICAR test string")
    demo.add_argument("--dir", type=Path, default=Path("demo"), help="where the demo lives (default ./demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        match args.command:
            case "passwd":
                return _passwd()
            case "demo":
                from maildetour.demo import run_demo

                return run_demo(args.dir)
        config = load_config(args.config)
        match args.command:
            case "serve":
                return _serve(config, args.verbose)
            case "check":
                from maildetour.app import validate

                validate(config)
                print(report.routing_table(config))
                return 0
            case "dkim":
                return _dkim_keygen(config, args.bits)
            case "route":
                return _route(config, args.address)
            case "trace":
                return _with_db(config, lambda conn: report.trace(conn, args.id))
            case "queue" if args.release:
                return _release(config, args.release)
            case "queue" if args.flush:
                return _flush(config)
            case "queue":
                return _with_db(config, lambda conn: report.queue(conn, include_all=args.all))
    except ConfigError as exc:
        print(f"maildetour: config error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"maildetour: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 2


def _serve(config: Config, verbose: bool) -> int:
    from maildetour.app import App, validate

    validate(config)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
    asyncio.run(App(config).run())
    return 0


def _route(config: Config, text: str) -> int:
    parsed = parse_address(text.strip("<>"))
    if isinstance(parsed, AddressError):
        print(f"maildetour: {text!r} is not an address we accept: {parsed.reason}", file=sys.stderr)
        return 1
    table = RoutingTable.from_config(config)
    print(report.route_story(table, route(table, parsed)))
    return 0


def _with_db(config: Config, show: "report.Show") -> int:
    if not config.queue_db.exists():
        print(f"maildetour: no queue yet at {config.queue_db}", file=sys.stderr)
        return 1
    conn = sqlite3.connect(f"file:{config.queue_db}?mode=ro", uri=True)
    try:
        text, found = show(conn)
    finally:
        conn.close()
    print(text)
    return 0 if found else 1


def _dkim_keygen(config: Config, bits: int) -> int:
    import secrets

    from maildetour.sign.dkim import generate_key

    signing = config.signing
    if signing is None:
        print("maildetour: config error: signing: no [signing] table to make a key for", file=sys.stderr)
        return 1
    try:
        record = generate_key(signing.dkim_key, bits)
    except FileExistsError:
        print(f"maildetour: {signing.dkim_key} exists; not overwriting a key", file=sys.stderr)
        return 1
    print(f"wrote {signing.dkim_key}")
    if not signing.srs_secret_file.exists():
        signing.srs_secret_file.touch(mode=0o600)
        signing.srs_secret_file.write_text(secrets.token_urlsafe(32) + "\n")
        print(f"wrote {signing.srs_secret_file} (SRS secret; add new lines on top to rotate)")
    # Zone files take TXT data as strings of at most 255 characters each.
    chunks = " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))
    print(f"publish in DNS:\n{signing.selector}._domainkey.{signing.domain}. IN TXT ( {chunks} )")
    return 0


def _flush(config: Config) -> int:
    """Like `postqueue -f`: a running server retries every queued copy now; with no server
    running, the queue is marked so that everything is due at the next start."""
    import os
    import signal

    from maildetour.app import PID_FILE

    pid = _server_pid(config.server.state_dir / PID_FILE)
    if pid is not None:
        os.kill(pid, signal.SIGUSR1)
        print(f"asked the server (pid {pid}) to retry every queued copy now")
        return 0
    if not config.queue_db.exists():
        print("queue is empty")
        return 0
    conn = sqlite3.connect(config.queue_db)
    try:
        with conn:
            count = conn.execute("UPDATE copies SET next_at = 0 WHERE state = 'queued'").rowcount
    finally:
        conn.close()
    print(f"no server running; {count} queued copies are due at the next start")
    return 0


def _release(config: Config, queue_id: str) -> int:
    """Quarantined copies of `queue_id` go back to the queue (attempts and failure clock reset,
    the same target: the last one of their detour chain), and the queue is flushed."""
    import time

    if not config.queue_db.exists():
        print("maildetour: no queue yet", file=sys.stderr)
        return 1
    conn = sqlite3.connect(config.queue_db, timeout=10)
    try:
        with conn:
            count = conn.execute(
                "UPDATE copies SET state='queued', attempts=0, first_failure=NULL, next_at=0"
                " WHERE queue_id=? AND state='quarantined'", (queue_id,)).rowcount
            if count:
                conn.execute("UPDATE messages SET finished=0 WHERE queue_id=?", (queue_id,))
                conn.execute("INSERT INTO events (queue_id, copy_id, at, kind, target, detail)"
                             " VALUES (?, NULL, ?, 'released', '', ?)",
                             (queue_id, time.time(), f"{count} quarantined copies queued again by the operator"))
    finally:
        conn.close()
    if not count:
        print(f"maildetour: no quarantined copies of {queue_id}", file=sys.stderr)
        return 1
    print(f"released {count} copies of {queue_id}")
    return _flush(config)


def _server_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process is a maildetour (a stale file after a crash may
    name an unrelated process, which must not get a signal)."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"maildetour" in cmdline else None


def _passwd() -> int:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            print("maildetour: the passwords differ", file=sys.stderr)
            return 1
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if not first:
        print("maildetour: empty password", file=sys.stderr)
        return 1
    print(hash_password(first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
