"""Credentials of IMAP accounts (maildetour.delivery.imap_auth): password files, password and
token commands (run for real with /bin/sh), and the XOAUTH2 initial response."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path
from typing import Any

from maildetour.config.model import ImapAccount
from maildetour.delivery.imap_auth import (
    MAX_SECRET_BYTES,
    CredentialError,
    Secret,
    read_password_file,
    read_secret,
    run_secret_command,
    xoauth2_response,
)


def run(command: str, timeout: float = 5.0) -> Secret | CredentialError:
    return asyncio.run(run_secret_command(command, timeout, "password command"))


def account(**changes: Any) -> ImapAccount:
    base: dict[str, Any] = dict(name="gmail", host="imap.example.test", port=993, tls="implicit",
                                user="ituki@example.test", timeout=5.0, connections=1)
    base.update(changes)
    return ImapAccount(**base)


def test_command_gives_its_first_line_without_the_newline() -> None:
    assert run("printf 'pa ss word  \\nsecond line\\n'") == Secret("pa ss word  ")
    assert run("printf 'no newline at all'") == Secret("no newline at all")
    assert run("printf 'crlf\\r\\nnext\\r\\n'") == Secret("crlf")
    assert run("printf 'pässwörd\\n'") == Secret("pässwörd")


def test_a_secret_never_shows_in_its_repr() -> None:
    secret = run("echo hunter2")
    assert secret == Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)


def test_nonzero_exit_is_an_error_that_does_not_contain_the_output() -> None:
    result = run("echo s3cret-output; echo more-s3cret >&2; exit 3")
    assert result == CredentialError("password command exited with status 3")


def test_killed_command_is_an_error() -> None:
    result = run("kill -9 $$")
    assert result == CredentialError("password command was killed by signal 9")


def test_empty_output_and_unusable_output_are_errors() -> None:
    assert run("true") == CredentialError(
        "password command output is empty (the first line is the secret)")
    assert run("printf '\\nsecond line is not used\\n'") == CredentialError(
        "password command output is empty (the first line is the secret)")
    assert run("printf 'a\\0b\\n'") == CredentialError("password command output contains a NUL byte")
    assert run("printf '\\377\\376\\n'") == CredentialError("password command output is not UTF-8")


def test_oversized_output_is_an_error() -> None:
    result = run(f"head -c {MAX_SECRET_BYTES + 10} /dev/zero | tr '\\0' x")
    assert result == CredentialError(f"password command printed more than {MAX_SECRET_BYTES} bytes")


def test_timeout_kills_the_command_and_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    started = time.monotonic()
    # The shell starts a child that would print the secret late; both must be killed.
    result = run(f"echo $$ > {pids}; (sleep 30; echo late-secret) & echo $! >> {pids}; wait",
                 timeout=0.5)
    assert time.monotonic() - started < 5
    assert result == CredentialError("password command timed out after 0.5s and was killed")
    for pid in (int(line) for line in pids.read_text().split()):
        assert not _alive(pid), f"process {pid} survived the timeout"


def test_a_command_that_cannot_run_is_an_error() -> None:
    assert run("/nonexistent/program") == CredentialError("password command exited with status 127")


def test_password_file_first_line_read_at_each_call(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("first password\nignored\n")
    assert asyncio.run(read_password_file(path)) == Secret("first password")
    path.write_text("rotated")  # no newline: the whole content is the line
    assert asyncio.run(read_password_file(path)) == Secret("rotated")


def test_missing_or_empty_password_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert asyncio.run(read_password_file(missing)) == CredentialError(
        f"password file {missing} cannot be read (ENOENT)")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert asyncio.run(read_password_file(empty)) == CredentialError(
        f"password file {empty} is empty (the first line is the secret)")


def test_read_secret_uses_the_configured_source(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("from the file\n")
    assert asyncio.run(read_secret(account(password_file=path))) == Secret("from the file")
    assert asyncio.run(read_secret(account(password_command="echo from the command"))) == \
        Secret("from the command")
    assert asyncio.run(read_secret(account(auth="xoauth2", token_command="echo ya29.token"))) == \
        Secret("ya29.token")
    assert asyncio.run(read_secret(account(auth="xoauth2", token_command="exit 1"))) == \
        CredentialError("token command exited with status 1")


def test_xoauth2_initial_response_is_googles_format() -> None:
    encoded = xoauth2_response("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    assert base64.b64decode(encoded) == (
        b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01")
    # Google's documented example of the same string, base64-encoded:
    assert encoded == ("dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52"
                       "YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; reaped children of init disappear quickly.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
