"""Reading Dovecot's passwd-file format: the one password list maildetour and Dovecot share.

What it does: `parse_passwd_file(text)` returns the password field of each user in a file of
Dovecot's `passwd-file` format (`user:password:uid:gid:gecos:home:shell:extra_fields`, one
user a line), so `[pop3] passwd_file` can point at the very file Dovecot's `passdb` reads and
one list serves maildetour's POP3 and Dovecot's IMAP (issue 12).

Read as Dovecot reads it: blank lines and lines starting with `#` or `:` are skipped; the user
name ends at the first `:`, the password at the next one; every later field is ignored (no
uid, home or extra fields matter here). User names are lowercased (maildetour's logins ignore
case; configure Dovecot with `username_format=%Lu` to match). A user listed again is ignored
after its first line, as Dovecot does.

Pure: text in, values out; which users are mailboxes and whether their hashes are usable is the
caller's business (`core.password.hash_problem`). Exposure: internal (an operator's file).
Failure: never raises for odd lines; a line without `:` is returned in `malformed` (its number)
for the caller to report.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PasswdEntry:
    user: str  # lowercased
    password: str  # "{SCHEME}hash", or "" (no password: Dovecot lets nobody in with it)
    line: int  # 1-based, for messages


@dataclass(frozen=True, slots=True)
class PasswdFile:
    entries: dict[str, PasswdEntry]  # user -> its first line
    malformed: tuple[int, ...]  # numbers of lines that name no user


def parse_passwd_file(text: str) -> PasswdFile:
    """The users and password fields of a Dovecot passwd-file (see the module header)."""
    entries: dict[str, PasswdEntry] = {}
    malformed: list[int] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.startswith(("#", ":")):
            continue
        user, colon, rest = line.partition(":")
        if not colon or not user.strip():
            malformed.append(number)
            continue
        key = user.strip().lower()
        if key not in entries:
            entries[key] = PasswdEntry(key, rest.partition(":")[0], number)
    return PasswdFile(entries, tuple(malformed))
