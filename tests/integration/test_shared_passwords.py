"""One password list for maildetour's POP3 and Dovecot's IMAP. Issue 12.

`[pop3] passwd_file` names the Dovecot passwd-file that Dovecot's `passdb` reads; the hash in it
comes from `maildetour passwd` (`{ARGON2ID}...`). A real Dovecot logs the mailbox in over IMAP
and the real `maildetour serve` over POP3 with the same password; after the line changes (and
a `maildetour reload`), both take the new password and refuse the old one. Users of the file
that are no mailbox of ours (here one with a SHA512-CRYPT hash, which maildetour does not
verify) are Dovecot's business and do not stop maildetour.
"""

from __future__ import annotations

import imaplib
import poplib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Server, running_server
from tests.integration.test_dovecot_imap import plain_dovecot
from tests.peers import need

ADDRESS = "ituki@gm.example.net"
# A Dovecot-only user: `doveadm pw -s SHA512-CRYPT -p other`. maildetour never looks at it.
DOVECOT_ONLY = ("root@example.com:{SHA512-CRYPT}$6$qHvdxB1dlgK7SRBo$zUJbZM6ZLRc4wPa3nYDnIa8qzZHOdw1SNV3AM"
                "Q2ZVQRFsvRIunpkVl.jbv2cOl1sTHpEuJqsO7k1nM1xQD8kp.::::::\n")

MAILDETOUR = """\
[server]
hostname = "mx.example.com"
[smtp]
listen = ["127.0.0.1:{{smtp_port}}"]
domains = ["example.com"]
[pop3]
listen = ["127.0.0.1:{{pop3_port}}"]
passwd_file = "{passwd}"
[delivery]
dns_servers = ["127.0.0.1:9"]
[mailbox."{address}"]
"""


def hash_of(password: str) -> str:
    """What `maildetour passwd` prints for `password`."""
    done = subprocess.run([sys.executable, "-m", "maildetour.cli", "passwd"], input=password + "\n",
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory Dovecot's unprivileged processes can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="maildetour-passwd-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def dovecot(base: Path) -> Iterator[int]:
    """Dovecot reading `base/passwd` (the test writes the mailbox's line before it logs in); the
    IMAP port."""
    # A refused login is answered at once.
    with plain_dovecot(base, DOVECOT_ONLY, extra="auth_failure_delay = 0\n") as port:
        yield port


def imap_login(port: int, password: str) -> bool:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    try:  # SASL PLAIN: the password as UTF-8 (imaplib's LOGIN takes ASCII only)
        client.authenticate("PLAIN", lambda _: f"\0{ADDRESS}\0{password}".encode())
    except imaplib.IMAP4.error:
        return False
    finally:
        client.shutdown()
    return True


def pop3_login(server: Server, password: str) -> bool:
    assert server.pop3_port is not None
    client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    try:
        client.user(ADDRESS.upper())  # logins ignore case, as Dovecot's with %Lu
        client.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        client.close()
    return True


def reload(server: Server) -> None:
    before = server.log().count("config reloaded")
    result = server.cli("reload")
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 15
    while server.log().count("config reloaded") == before:
        assert time.monotonic() < deadline and "reload refused" not in server.log(), server.log()
        time.sleep(0.02)


def test_dovecot_verifies_the_hash_maildetour_passwd_prints() -> None:
    doveadm = need("doveadm", "dovecot-core")
    encoded = hash_of("s3cret pw")
    right = subprocess.run([doveadm, "pw", "-t", encoded, "-p", "s3cret pw"], capture_output=True, text=True,
                           timeout=30)
    assert right.returncode == 0 and right.stdout.strip() == f"{encoded} (verified)", right.stderr
    wrong = subprocess.run([doveadm, "pw", "-t", encoded, "-p", "s3cret pW"], capture_output=True, text=True,
                           timeout=30)
    assert wrong.returncode != 0 and "Password mismatch" in wrong.stderr


def test_one_passwd_file_serves_dovecot_imap_and_maildetour_pop3(base: Path, dovecot: int, tmp_path: Path) -> None:
    passwd = base / "passwd"
    first = hash_of("first pass wörd")
    assert first.startswith("{ARGON2ID}$argon2id$")
    passwd.write_text(DOVECOT_ONLY + f"{ADDRESS}:{first}::::::\n")
    config = MAILDETOUR.format(passwd=passwd, address=ADDRESS)

    with running_server(tmp_path / "md", config, pop3=True) as server:
        assert imap_login(dovecot, "first pass wörd")
        assert pop3_login(server, "first pass wörd")
        assert not imap_login(dovecot, "wrong")
        assert not pop3_login(server, "wrong")

        # The password changes in the one file; Dovecot reads it again by itself, maildetour at
        # the reload (`maildetour check` reads it as well).
        passwd.write_text(DOVECOT_ONLY + f"{ADDRESS}:{hash_of('second')}::::::\n")
        assert server.cli("check").returncode == 0
        reload(server)
        assert imap_login(dovecot, "second") and pop3_login(server, "second")
        assert not imap_login(dovecot, "first pass wörd")
        assert not pop3_login(server, "first pass wörd")


def test_a_mailbox_line_maildetour_cannot_verify_is_a_config_error_naming_the_line(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text(DOVECOT_ONLY + f"{ADDRESS}:{{SHA512-CRYPT}}$6$abc$def::::::\n")
    config = tmp_path / "maildetour.toml"
    config.write_text(MAILDETOUR.format(passwd=passwd, address=ADDRESS).format(smtp_port=2525, pop3_port=1100))
    result = subprocess.run([sys.executable, "-m", "maildetour.cli", "check", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith(f"maildetour: config error: pop3.passwd_file: {passwd}: line 2 ({ADDRESS}): "
                                    "{SHA512-CRYPT} is not a scheme maildetour verifies")
    assert len(result.stderr.strip().splitlines()) == 1
