"""Command line: argument parsing and dispatch; what each verb does is in `commands`.

Exit codes: 0 ok, 1 bad input or config (one line naming the key and the reason), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maildetour import __version__, commands
from maildetour.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maildetour", description=(
        "Forward mail at once; detour refused copies instead of bouncing; never reveal hidden addresses."))
    parser.add_argument("--version", action="version", version=f"maildetour {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
        return p

    serve = with_config("serve", "run the server")
    serve.add_argument("--verbose", "-v", action="store_true")
    serve.add_argument("--log-format", choices=("plain", "json"), default="plain",
                       help="server log lines as key=value (default, fit for journald) or JSON")
    with_config("check", "validate the config and print the routing table")
    with_config("reload", "check the config, then tell the running server to switch to it (SIGHUP)")
    with_config("route", "where mail for ADDRESS goes, and why").add_argument("address")
    with_config("trace", "the story of one message, by queue id or Message-ID").add_argument("id")
    queue = with_config("queue", "list queued, held and quarantined copies, or change the queue")
    queue.add_argument("--all", action="store_true", help="include finished copies of recent messages")
    action = queue.add_mutually_exclusive_group()
    action.add_argument("--flush", action="store_true", help="make every queued copy due now "
                                                             "(tells a running server by SIGUSR1)")
    action.add_argument("--release", metavar="QUEUE_ID", help="queue a message's held or quarantined "
                                                              "copies again (to their last target), then flush")
    action.add_argument("--hold", metavar="QUEUE_ID", help="hold a message's queued copies until released")
    action.add_argument("--delete", metavar="QUEUE_ID", help="delete a message's undelivered copies")
    imap = sub.add_parser("imap", help="IMAP accounts of detour steps")
    imap_test = imap.add_subparsers(dest="imap_command", required=True).add_parser(
        "test", help="log in to [imap.NAME], check its folder, append nothing; one line says how it went")
    imap_test.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
    imap_test.add_argument("name", help="the account's NAME, as in detour = [\"imap:NAME\"]")
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
                return commands.passwd()
            case "demo":
                from maildetour.demo import run_demo

                return run_demo(args.dir)
        config = load_config(args.config)
        match args.command:
            case "serve":
                return commands.serve(config, args.verbose, args.log_format)
            case "check":
                return commands.check(config)
            case "reload":
                return commands.reload(config)
            case "dkim":
                return commands.dkim_keygen(config, args.bits)
            case "imap":
                return commands.imap_test(config, args.name)
            case "route":
                return commands.route(config, args.address)
            case "trace":
                return commands.trace(config, args.id)
            case "queue" if args.flush:
                return commands.queue_flush(config)
            case "queue" if args.release or args.hold or args.delete:
                action = "release" if args.release else "hold" if args.hold else "delete"
                return commands.queue_change(config, action, args.release or args.hold or args.delete)
            case "queue":
                return commands.queue_list(config, args.all)
    except ConfigError as exc:
        print(f"maildetour: config error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"maildetour: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
