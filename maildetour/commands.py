"""What each command-line verb does, given its parsed arguments; `cli` parses and dispatches.

Operator-facing. Each function prints its result and returns the exit code: 0 done, 1 nothing
matched, refused or bad input (one line on stderr; `route` of an address it would refuse and a
`dns check` that found problems print their answer on stdout too). Config errors are raised as ConfigError
for `cli` to print. The queue is read and changed only through the store (like postqueue and
postsuper ask the queue owner); a running server is told by signal to pick changes up
(SIGUSR1: flush, SIGUSR2: read the queue again, SIGHUP: read the config again).
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import signal
import sqlite3
import sys

from maildetour import eventloop, logs, malloc, report
from maildetour.command_base import fail, server_pid, with_store
from maildetour.config.model import Config
from maildetour.core.address import AddressError, parse_address
from maildetour.core.password import hash_password
from maildetour.core.routing import Accept
from maildetour.core.routing import route as route_address
from maildetour.logs import LogFormat
from maildetour.sign.srs import make_secret_file


def serve(config: Config, verbose: bool, log_format: LogFormat = "plain") -> int:
    from maildetour.app import App
    from maildetour.intake_workers import IntakeFailed
    from maildetour.wiring import validate

    validate(config)
    logs.setup(logging.DEBUG if verbose else logging.INFO, log_format)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # the operator's own setting wins
        malloc.return_large_buffers()
    # uvloop when it can (`eventloop`); the SMTP intake workers, if any, choose the same way.
    try:
        eventloop.run(App(config, log_format=log_format, verbose=verbose).run(), config.server.event_loop)
    except IntakeFailed as exc:  # the worker's own line (logged above) says why
        return fail(f"SMTP intake workers did not start: {exc}")
    return 0


def check(config: Config) -> int:
    from maildetour.wiring import validate

    validate(config)
    print(report.routing_table(config))
    print(_schema_line(config))
    return 0


def _schema_line(config: Config) -> str:
    """The queue database's schema version (issue 12); a newer one than ours raises SchemaTooNew
    (an OSError: `serve` would refuse it, so `check` fails too)."""
    if config.store.url is not None:  # (PostgreSQL: `[store] url`, issue 14)
        from maildetour.store.postgres_schema import describe as describe_database

        return describe_database(config.store.url)
    from maildetour.store.schema import describe

    return describe(config.queue_db)


def reload(config: Config) -> int:
    """Check the config as the server would read it, then SIGHUP the server of its state dir.
    A config that fails the check is not sent (the error is raised for `cli` to print); the
    server checks again and, if it still cannot use it, logs one line and keeps the old."""
    from maildetour.wiring import validate

    validate(config)
    pid = server_pid(config)
    if pid is None:
        return fail(f"no server is running on {config.server.state_dir}")
    os.kill(pid, signal.SIGHUP)
    print(f"reload requested from pid {pid}; its log says when the new config is in use")
    return 0


def route(config: Config, text: str) -> int:
    parsed = parse_address(text.strip("<>"))
    if isinstance(parsed, AddressError):
        return fail(f"{text!r} is not an address we accept: {parsed.reason}")
    table = config.routing_table()
    found = route_address(table, parsed)
    print(report.route_story(table, found, config.imap, mailbox=report.mailbox_kind(config)))
    return 0 if isinstance(found, Accept) else 1  # refused at RCPT: exit 1, as for any refusal


# --- the queue ---------------------------------------------------------------------------------
def trace(config: Config, key: str) -> int:
    """The story of one message; every error is one `maildetour: ` line on stderr, exit 1."""
    try:
        story = with_store(config, lambda store: store.story(key), readonly=True)
    except sqlite3.Error as exc:  # a damaged or foreign queue file: say so, no traceback
        return fail(f"{config.queue_db}: cannot read the queue: {exc}")
    if story is None:
        return fail(f"no message with queue id or Message-ID {key!r}")
    print(report.trace(story))
    return 0


# `maildetour queue ...` (list, show, flush, hold, release, delete, requeue): `queue_commands`.


def imap_test(config: Config, name: str) -> int:
    """`maildetour imap test NAME`: one line, exit 0 when the account works."""
    from maildetour.delivery.imap_out import probe

    account = config.imap.get(name.removeprefix("imap:"))
    if account is None:
        return fail(f"no [imap.\"{name}\"] in {config.path}")
    ok, line = asyncio.run(probe(account))
    if not ok:
        return fail(f"imap:{account.name}: {line}")
    print(f"imap:{account.name}: {line}")
    return 0


# --- secrets -----------------------------------------------------------------------------------
def passwd() -> int:
    """Read a password (twice on a terminal, one line otherwise) and print its `{ARGON2ID}`
    hash: fit for `password_hash` and for a line of a Dovecot passwd-file (`pop3.passwd_file`)."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            return fail("the passwords differ")
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if not first:
        return fail("empty password")
    print(hash_password(first))
    return 0


def dkim_keygen(config: Config, bits: int) -> int:
    """Write each configured DKIM key that is missing (RSA `dkim_key`, and `ed25519_key` if
    set), never overwriting one; print the TXT record of every configured key. Exit 1 with one
    line when there is nothing to write or a key cannot be made (bad --bits, no openssl)."""
    from maildetour.dnsrecords import txt_data
    from maildetour.sign.dkim_keys import (
        DkimKeyError,
        check_rsa_bits,
        generate_ed25519_key,
        generate_key,
        public_key,
    )

    signing = config.signing
    if signing is None:
        return fail("config error: signing: no [signing] table to make a key for")
    keys = [(signing.selector, signing.dkim_key, "rsa")]
    if signing.ed25519_selector and signing.ed25519_key:
        keys.append((signing.ed25519_selector, signing.ed25519_key, "ed25519"))
    if all(path.exists() for _, path, _ in keys):
        return fail(f"{' and '.join(str(path) for _, path, _ in keys)} exist; not overwriting a key "
                     "(`maildetour dns records` prints their records)")
    records = []
    try:
        check_rsa_bits(bits)
        for selector, path, algorithm in keys:
            if path.exists():
                record = public_key(path, algorithm).record
                print(f"kept {path} (it exists; keys are never overwritten)")
            else:
                record = generate_key(path, bits) if algorithm == "rsa" else generate_ed25519_key(path)
                print(f"wrote {path} ({algorithm})")
            records.append(f"{selector}._domainkey.{signing.domain}. IN TXT {txt_data(record)}")
    except DkimKeyError as exc:
        return fail(str(exc))
    if config.srs is not None and not config.srs.made_here and make_secret_file(config.srs.secret_file):
        print(f"wrote {config.srs.secret_file} (SRS secret; see docs/operations.md to rotate it)")
    print("publish in DNS:\n" + "\n".join(records))
    return 0


# --- DNS ---------------------------------------------------------------------------------------
def _server_addresses(given: list[str]) -> tuple[str, ...] | str:
    """The --ip values as normalised addresses, or the reason one is not an address."""
    import ipaddress

    found = []
    for text in given:
        try:
            found.append(str(ipaddress.ip_address(text.strip("[]"))))
        except ValueError:
            return f"--ip {text!r} is not an IPv4 or IPv6 address"
    return tuple(dict.fromkeys(found))


def dns_records(config: Config, ips: list[str]) -> int:
    """`maildetour dns records`: the records to publish, as zone-file lines."""
    from maildetour.dnsdoctor import facts
    from maildetour.dnsrecords import expected, zone_text

    addresses = _server_addresses(ips)
    if isinstance(addresses, str):
        return fail(addresses)
    found = facts(config, addresses)
    skipped = [key.problem for key in found.dkim if key.key is None]
    if not addresses:
        skipped.append(f"A/AAAA of {found.hostname} and the PTR of each address: give --ip ADDRESS to have them "
                       "here (the SPF records then name the addresses instead of mx)")
    print(zone_text(expected(found), skipped))
    return 0


def dns_check(config: Config, ips: list[str]) -> int:
    """`maildetour dns check`: one line per expected record (ok, missing, wrong, error),
    looked up with the config's DNS servers; exit 1 when any is not ok."""
    from maildetour.dnsdoctor import diagnose, facts
    from maildetour.wiring import make_resolvers

    addresses = _server_addresses(ips)
    if isinstance(addresses, str):
        return fail(addresses)
    findings = diagnose(facts(config, addresses), make_resolvers(config)[1])
    for finding in findings:
        print(finding.line)
    bad = [f for f in findings if f.status != "ok"]
    if bad:
        return fail(f"dns check: {len(bad)} of {len(findings)} records missing, wrong or not answered")
    return 0
