"""Command line: argument parsing and dispatch; what each verb does is in `commands` (and
`queue_commands` for `maildetour queue ...`, `backup_commands` for `backup` and `restore`).

Exit codes: 0 ok, 1 bad input or config (one line naming the key and the reason), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

from maildetour import __version__, backup_commands, commands, queue_commands
from maildetour.config import ConfigError, load_config
from maildetour.config.model import Config
from maildetour.config.reader import parse_duration
from maildetour.store.listing import UNFINISHED
from maildetour.store.records import CopyState


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
    _queue_parser(sub)
    with_config("backup", "copy the queue (consistently, while the server runs), spool, mailboxes, secrets "
                          "and config into DIR, a new or empty directory").add_argument("dir", type=Path)
    restore = with_config("restore", "bring a backup back into the config's state dir (empty, no server "
                                     "running); files named by the config are written where missing")
    restore.add_argument("dir", type=Path, help="the backup's directory")
    restore.add_argument("--force", action="store_true", help="restore into a state dir that is not empty: "
                                                              "its queue and spool are replaced")
    imap = sub.add_parser("imap", help="IMAP accounts of detour steps")
    imap_test = imap.add_subparsers(dest="imap_command", required=True).add_parser(
        "test", help="log in to [imap.NAME], check its folder, append nothing; one line says how it went")
    imap_test.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
    imap_test.add_argument("name", help="the account's NAME, as in detour = [\"imap:NAME\"]")
    sub.add_parser("passwd", help="read a password and print its {ARGON2ID} hash (Dovecot reads it too) "
                                  "for password_hash or a pop3.passwd_file line")
    dkim = sub.add_parser("dkim", help="DKIM key management")
    dkim_sub = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = dkim_sub.add_parser("keygen", help="write the [signing] DKIM keys that are missing (RSA, and "
                                                "ed25519 if configured; the SRS secret file too) and print "
                                                "the DNS TXT records to publish")
    keygen.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key length, 1024 to 4096 (default 2048)")
    _dns_parsers(sub)
    demo = sub.add_parser("demo", help="write the seed demo config (if missing) and run it, "
                                       "with a stand-in gmail that refuses the EICAR test string")
    demo.add_argument("--dir", type=Path, default=Path("demo"), help="where the demo lives (default ./demo)")
    return parser


def _dns_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`maildetour dns records|check --config F [--ip ADDRESS]...` (issue 12)."""
    dns = sub.add_parser("dns", help="the DNS records to publish, and a check of the published ones")
    dns_sub = dns.add_subparsers(dest="dns_command", required=True)
    for name, text in (("records", "print the MX, SPF, DKIM and DMARC records to publish (zone-file lines)"),
                       ("check", "look the records up (with delivery.dns_servers) and say, one line each, "
                                 "what is ok, missing or wrong; exit 1 if anything is")):
        p = dns_sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
        p.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                       help="the server's public address (repeat for IPv4 and IPv6); default: "
                            "the addresses of server.hostname")


# --- `maildetour queue ...` (issue 12); the work is in `queue_commands` ----------------------------
_OLD_QUEUE_FLAGS = ("flush", "hold", "release", "delete")  # `queue --hold ID`: the spelling before issue 12
_LIST_OPTIONS = ("json", "all", "state", "dest", "older_than")  # and --limit
_LIMIT = 10_000  # messages `queue list` shows unless --limit says otherwise


def _duration(text: str) -> float:
    try:
        return parse_duration("--older-than", text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected a duration like 10m, 2h or 3d, got {text!r}") from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of messages (1 or more), got {text!r}")
    return int(text)


def _list_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """`queue list`'s options, also taken by `queue` itself (`queue --json` = `queue list
    --json`). Without `defaults` (on `list`), one not given leaves what `queue` had."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--json", action="store_true", default=default(False),
                   help="one JSON object per message and line (postqueue -j)")
    p.add_argument("--all", action="store_true", default=default(False),
                   help="copies in every state, finished ones too, newest message first")
    p.add_argument("--state", action="append", choices=get_args(CopyState), metavar="STATE", default=default(None),
                   help=f"only copies in STATE ({', '.join(get_args(CopyState))}); repeat for more")
    p.add_argument("--dest", metavar="ADDR", default=default(None),
                   help="only copies going to ADDR (an address, imap:NAME, or a domain: any address at it)")
    p.add_argument("--older-than", type=_duration, metavar="DURATION", default=default(None),
                   help="only messages received longer ago than DURATION (30m, 2h, 3d)")
    p.add_argument("--limit", type=_count, metavar="N", default=default(_LIMIT),
                   help=f"list at most N messages (default {_LIMIT}); the totals count all")


def _queue_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`queue` alone lists (as `queue list`); `queue ACTION ...` for the rest. `--config` may
    come before or after ACTION; the older `--flush|--hold|--release|--delete` flags still work."""
    queue = sub.add_parser("queue", help="list the queue, show a message, or change it (postqueue, postsuper)",
                           description="Without an action: list queued, held and quarantined copies "
                                       "(the options are `queue list`'s).")
    queue.add_argument("--config", "-c", type=Path, help="the TOML config file")
    _list_options(queue, defaults=True)
    old = queue.add_mutually_exclusive_group()
    old.add_argument("--flush", action="store_true", help="older spelling of `queue flush`")
    for flag in ("hold", "release", "delete"):
        old.add_argument(f"--{flag}", metavar="QUEUE_ID", help=f"older spelling of `queue {flag} QUEUE_ID`")
    actions = queue.add_subparsers(dest="queue_action", metavar="ACTION")

    def action(name: str, text: str, *, queue_id: str = "") -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=text, description=text)
        # SUPPRESS: not given here, the value given before ACTION stays.
        p.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS, help="the TOML config file")
        if queue_id:
            p.add_argument("queue_id", metavar="QUEUE_ID", nargs="?" if queue_id == "optional" else None)
        return p

    _list_options(action("list", "list the queue like postqueue -p: a block per message, its copies with "
                                 "state, attempts, next attempt and last reply, and totals"), defaults=False)
    show = action("show", "a message's envelope, copies and headers (postcat)", queue_id="required")
    show.add_argument("--body", action="store_true", help="the whole message, body included")
    flush = action("flush", "make queued copies due now: all of them (postqueue -f), one message's, "
                            "or those going to --dest", queue_id="optional")
    flush.add_argument("--dest", metavar="ADDR", dest="flush_dest",
                       help="only copies going to ADDR (address, imap:NAME or domain)")
    action("hold", "hold a message's queued copies until released (postsuper -h)", queue_id="required")
    action("release", "queue a message's held or quarantined copies again where they stopped (postsuper -H)",
           queue_id="required")
    action("delete", "delete a message's undelivered copies; refused while one is in flight (postsuper -d)",
           queue_id="required")
    action("requeue", "send a message's quarantined, bounced or failed copies back to their first target "
                      "with a fresh attempt count (postsuper -r)", queue_id="required")


def _check_queue_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors argparse cannot see (exit 2): `--config` is required wherever it was given,
    an older flag does not mix with an action, nor the listing's options with another one."""
    if args.command != "queue":
        return
    if args.config is None:
        parser.error("queue: the following arguments are required: --config/-c")
    old = [f"--{flag}" for flag in _OLD_QUEUE_FLAGS if getattr(args, flag)]
    if old and args.queue_action is not None:
        parser.error(f"queue: {old[0]} and the action {args.queue_action!r} do not mix; use the action alone")
    listing = [f"--{o.replace('_', '-')}" for o in _LIST_OPTIONS if getattr(args, o)] + (
        ["--limit"] if args.limit != _LIMIT else [])
    if listing and (old or args.queue_action not in (None, "list")):
        parser.error(f"queue: {listing[0]} is for listing; not with {old[0] if old else args.queue_action!r}")


def _queue(config: Config, args: argparse.Namespace) -> int:
    if args.flush:
        return queue_commands.flush(config)
    if args.hold:
        return queue_commands.hold(config, args.hold)
    if args.release:
        return queue_commands.release(config, args.release)
    if args.delete:
        return queue_commands.delete(config, args.delete)
    match args.queue_action:
        case None | "list":
            states = tuple(dict.fromkeys(args.state)) if args.state else None if args.all else UNFINISHED
            return queue_commands.list_queue(config, states=states, dest=args.dest, older_than=args.older_than,
                                             limit=args.limit, newest_first=args.all, as_json=args.json)
        case "show":
            return queue_commands.show(config, args.queue_id, args.body)
        case "flush":
            return queue_commands.flush(config, args.queue_id, args.flush_dest)
        case "hold":
            return queue_commands.hold(config, args.queue_id)
        case "release":
            return queue_commands.release(config, args.queue_id)
        case "delete":
            return queue_commands.delete(config, args.queue_id)
        case "requeue":
            return queue_commands.requeue(config, args.queue_id)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_queue_args(parser, args)
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
            case "dns" if args.dns_command == "records":
                return commands.dns_records(config, args.ip)
            case "dns":
                return commands.dns_check(config, args.ip)
            case "imap":
                return commands.imap_test(config, args.name)
            case "route":
                return commands.route(config, args.address)
            case "trace":
                return commands.trace(config, args.id)
            case "queue":
                return _queue(config, args)
            case "backup":
                return backup_commands.backup(config, args.dir)
            case "restore":
                return backup_commands.restore(config, args.dir, args.force)
    except ConfigError as exc:
        print(f"maildetour: config error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"maildetour: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
