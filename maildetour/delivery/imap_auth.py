"""Credentials of an IMAP account: a password from a file or a command, or an OAuth2 token.

What it does: `read_secret(account)` returns the secret to log in with, read afresh at every
call (the IMAP agent calls it at each login, so a rotated password file or an expired token
needs no restart):
  password_file     its first line (the one source of truth, like `passwordeval`'s file);
  password_command  run with `/bin/sh -c`; the first line of its standard output (the msmtp
                    `passwordeval` / isync `PassCmd` convention);
  token_command     the same, for auth = "xoauth2": the output is a current OAuth2 access
                    token; `xoauth2_response` makes the SASL XOAUTH2 initial response of it.
"First line" means up to the first LF, without it, and without a CR just before it. Nothing
else is stripped (a password may end with spaces).
Contract: async and bounded. A command runs as a subprocess of its own session with stdin and
stderr closed, within the account's `timeout`; on timeout (or cancellation) its whole process
group is killed. A file is read in a worker thread. At most `MAX_SECRET_BYTES` are read.
Exposure: internal, but it handles secrets: a `Secret` never shows its value in `repr`, and a
`CredentialError`'s reason is our own words (the file's path, a command's exit status) and
never contains the secret, the command line or anything the command printed.
Failure: never raises for a missing file, a failing command, a timeout or unusable output:
those are `CredentialError` values (the IMAP agent reports them as temporary login failures).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from maildetour.config.model import ImapAccount

# An OAuth2 access token is a few KB at most (Microsoft's are the longest, ~2-4 KB); a password
# far less. A command printing more than this is broken, and we do not buffer its output.
MAX_SECRET_BYTES = 64 * 1024
# How long a killed command gets to be reaped before we stop waiting for it.
KILL_WAIT = 2.0
SHELL = "/bin/sh"


@dataclass(frozen=True, slots=True)
class Secret:
    """A password or access token; its value is kept out of `repr` (and so out of logs)."""

    value: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class CredentialError:
    """Why there is no secret: our own words, never the secret or a command's output."""

    reason: str


Credential = Secret | CredentialError


async def read_secret(account: ImapAccount) -> Credential:
    """The account's current password (auth = "password") or access token ("xoauth2")."""
    if account.auth == "xoauth2":
        if account.token_command is None:
            return CredentialError("no token_command configured")
        return await run_secret_command(account.token_command, account.timeout, "token command")
    if account.password_command is not None:
        return await run_secret_command(account.password_command, account.timeout,
                                        "password command")
    if account.password_file is not None:
        return await read_password_file(account.password_file)
    return CredentialError("no password_file or password_command configured")


async def read_password_file(path: Path) -> Credential:
    """The first line of the file at `path` (read in a worker thread: it may be on slow storage)."""
    try:
        data = await asyncio.to_thread(_read_head, path)
    except OSError as exc:
        return CredentialError(f"password file {path} cannot be read ({_errno_name(exc)})")
    return _first_line(data, f"password file {path}")


async def run_secret_command(command: str, timeout: float, what: str) -> Credential:
    """Run `command` with /bin/sh -c; the first line of its output, or why not.

    `what` names it in the error ("password command"); the command line itself is not
    repeated (it may carry a secret of its own)."""
    try:
        process = await asyncio.create_subprocess_exec(
            SHELL, "-c", command, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True)  # its own process group: a timeout kills its children too
    except OSError as exc:
        return CredentialError(f"{what} could not be started ({_errno_name(exc)})")
    assert process.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            data = await process.stdout.read(MAX_SECRET_BYTES + 1)
            while data and len(data) <= MAX_SECRET_BYTES:
                more = await process.stdout.read(MAX_SECRET_BYTES + 1 - len(data))
                if not more:
                    break
                data += more
            if len(data) > MAX_SECRET_BYTES:
                await _kill(process)
                return CredentialError(f"{what} printed more than {MAX_SECRET_BYTES} bytes")
            status = await process.wait()
    except TimeoutError:
        await _kill(process)
        return CredentialError(f"{what} timed out after {timeout:g}s and was killed")
    except BaseException:  # cancelled: leave nothing running behind us
        _signal_group(process)
        raise
    if status < 0:
        return CredentialError(f"{what} was killed by signal {-status}")
    if status != 0:
        return CredentialError(f"{what} exited with status {status}")
    return _first_line(data, f"{what} output")


def xoauth2_response(user: str, token: str) -> str:
    """The SASL XOAUTH2 initial client response (Google's and Microsoft's documented format):
    base64 of "user=USER ^A auth=Bearer TOKEN ^A ^A"."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode("utf-8")
    return base64.b64encode(raw).decode("ascii")


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read(MAX_SECRET_BYTES)


def _first_line(data: bytes, what: str) -> Credential:
    line = data.split(b"\n", 1)[0]
    if line.endswith(b"\r"):
        line = line[:-1]
    if not line:
        return CredentialError(f"{what} is empty (the first line is the secret)")
    if b"\x00" in line:
        return CredentialError(f"{what} contains a NUL byte")
    try:
        return Secret(line.decode("utf-8"))
    except UnicodeDecodeError:
        return CredentialError(f"{what} is not UTF-8")


def _signal_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group (it leads its own session; pgid == its pid)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


async def _kill(process: asyncio.subprocess.Process) -> None:
    _signal_group(process)
    try:
        async with asyncio.timeout(KILL_WAIT):
            await process.wait()
    except TimeoutError:
        pass


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
