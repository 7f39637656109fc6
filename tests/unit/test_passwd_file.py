"""`[pop3] passwd_file`: Dovecot's passwd-file as the mailboxes' one password list. Issue 12.

The parser reads the format as Dovecot does (`core.passwd_file`); `wiring.pop3_accounts` takes
the lines of our mailboxes from it, at start, on reload and in `check`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from maildetour.config import Config, ConfigError
from maildetour.core.passwd_file import parse_passwd_file
from maildetour.core.password import hash_password, verify_password
from maildetour.wiring import pop3_accounts, validate
from tests.configs import SEED, seed_config

GM, PC = "ituki@gm.example.net", "ituki@pc.example.net"


def test_the_file_is_read_as_dovecot_reads_it() -> None:
    listed = parse_passwd_file(
        "# users of mail.example.net\n"
        "\n"
        "Ituki@GM.example.net:{ARGON2ID}$argon2id$x:1000:1000::/home/ituki::userdb_quota_rule=*:storage=1G\n"
        "ituki@gm.example.net:{PLAIN}second-line-ignored::::::\n"
        "nopass@example.net:\n"
        "bare-user\n"
        ":{PLAIN}no-user\n")
    assert listed.entries[GM].password == "{ARGON2ID}$argon2id$x"  # later fields do not matter
    assert listed.entries[GM].line == 3
    assert listed.entries["nopass@example.net"].password == ""
    assert set(listed.entries) == {GM, "nopass@example.net"}
    assert listed.malformed == (6,)


def config_with_file(tmp_path: Path, lines: str) -> Config:
    """The seed config with `[pop3] passwd_file` holding `lines` (the gm box has no password of its own)."""
    (tmp_path / "users").write_text(lines)
    text = SEED.replace('password = "change-me-too"', "").replace(
        'listen = ["127.0.0.1:1100"]', 'listen = ["127.0.0.1:1100"]\npasswd_file = "users"')
    return seed_config(tmp_path, text)


def test_mailboxes_listed_in_the_file_take_its_password_the_others_keep_their_own(tmp_path: Path) -> None:
    encoded = hash_password("from the file")
    config = config_with_file(tmp_path, f"root@example.com:{{SHA512-CRYPT}}$6$x$y::::::\n{GM}:{encoded}::::::\n")
    accounts = pop3_accounts(config)
    assert accounts[GM].password_hash == encoded and accounts[GM].password is None
    assert verify_password(accounts[GM].password_hash, "from the file")
    assert accounts[PC].password == "change-me"  # not in the file: its own password
    validate(config)  # `check` reads the file too


@pytest.mark.parametrize(("lines", "key", "words"), [
    (f"{GM}:{{SHA512-CRYPT}}$6$x$y::::::\n", "pop3.passwd_file", "line 1 (ituki@gm.example.net): {SHA512-CRYPT}"),
    (f"{GM}:{{ARGON2ID}}$argon2id$broken::::::\n", "pop3.passwd_file", "not a well-formed {ARGON2ID} hash"),
    ("just a line\n", "pop3.passwd_file", "line 1 is not user:password:..."),
    (f"{PC}:{{PLAIN}}x::::::\n", 'mailbox."ituki@pc.example.net".password', "also in pop3.passwd_file (line 1)"),
])
def test_a_file_maildetour_cannot_use_is_a_config_error_naming_the_line(
        tmp_path: Path, lines: str, key: str, words: str) -> None:
    config = config_with_file(tmp_path, lines)
    with pytest.raises(ConfigError) as caught:
        pop3_accounts(config)
    assert caught.value.key == key and words in caught.value.reason


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    config = config_with_file(tmp_path, "")
    (tmp_path / "users").unlink()
    with pytest.raises(ConfigError) as caught:
        validate(config)
    assert caught.value.key == "pop3.passwd_file" and "No such file" in caught.value.reason
