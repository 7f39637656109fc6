"""Password hashes for mailbox logins (maildetour.core.password). Issues 3 and 12."""

from __future__ import annotations

import base64
import hashlib

import pytest

from maildetour.core.password import hash_password, hash_problem, hash_scrypt, verify_password

# Made by Debian 12's Dovecot 2.3.19: `doveadm pw -s ARGON2ID -p 's3cret pw'`.
DOVECOT_ARGON2ID = ("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$dpzoUSscVEeBWwK0DgB9Qg$"
                    "t24GZcu7ZobQKKSzH0cRb/Z5RB7S7YLGz4V0tHlowpk")


def test_hash_is_dovecots_argon2id_with_its_parameters_and_a_random_salt() -> None:
    first, second = hash_password("change-me"), hash_password("change-me")
    assert first.startswith("{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$")  # Dovecot's scheme prefix
    assert first != second  # fresh salt each time
    assert "change-me" not in first
    assert hash_problem(first) is None


@pytest.mark.parametrize("make", [hash_password, hash_scrypt])
def test_verify_accepts_the_right_password_only(make: object) -> None:
    encoded = make("pä ss wörd")  # type: ignore[operator]
    assert verify_password(encoded, "pä ss wörd")
    assert not verify_password(encoded, "pä ss word")
    assert not verify_password(encoded, "")


def test_hashes_dovecot_made_verify_and_the_older_scrypt_ones_keep_working() -> None:
    assert verify_password(DOVECOT_ARGON2ID, "s3cret pw")
    assert not verify_password(DOVECOT_ARGON2ID, "s3cret pW")
    assert verify_password("{argon2id}" + DOVECOT_ARGON2ID.removeprefix("{ARGON2ID}"), "s3cret pw")  # any case
    older = "scrypt$ln=4,r=1,p=1$c2FsdHNhbHQ$" + _key("pw", b"saltsalt", 4, 1, 1)
    assert verify_password(older, "pw") and hash_problem(older) is None


def test_clear_text_from_a_dovecot_passwd_file_is_compared_but_never_empty() -> None:
    assert verify_password("{PLAIN}change-me", "change-me")
    assert verify_password("{CLEARTEXT}change-me", "change-me")
    assert not verify_password("{PLAIN}change-me", "change-m")
    assert not verify_password("{PLAIN}", "")
    assert hash_problem("{PLAIN}x", clear_text=True) is None
    assert "use password" in (hash_problem("{PLAIN}x") or "")  # not as a password_hash


@pytest.mark.parametrize(("encoded", "words"), [
    ("{SHA512-CRYPT}$6$salt$hash", "{SHA512-CRYPT} is not a scheme maildetour verifies"),
    ("{BLF-CRYPT}$2y$05$abc", "hash it again with `maildetour passwd`"),
    ("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5", "expected {ARGON2ID}"),
    ("{ARGON2ID}$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5", "not a well-formed"),
    ("{ARGON2ID}$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5", "not a well-formed"),
    ("{ARGON2ID}$argon2id$v=19$m=19456,t=99,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5", "not a well-formed"),
    ("scrypt$ln=40,r=8,p=1$c2FsdA$a2V5a2V5a2V5a2V5a2V5a2V5", "not a well-formed scrypt$"),
])
def test_hashes_that_cannot_be_verified_are_named_for_the_config_check(encoded: str, words: str) -> None:
    assert words in (hash_problem(encoded) or "")
    assert verify_password(encoded, "pw") is False


def test_verify_uses_the_parameters_in_the_string() -> None:
    cheap = "scrypt$ln=4,r=1,p=1$c2FsdHNhbHQ$" + _key("pw", b"saltsalt", 4, 1, 1)
    assert verify_password(cheap, "pw")
    assert not verify_password(cheap, "pw2")


@pytest.mark.parametrize("encoded", [
    "", "scrypt", "plain$x", "scrypt$ln=14,r=8,p=1$$", "scrypt$ln=14,r=8$c2FsdA$a2V5",
    "scrypt$ln=14,r=8,p=1$not base64!$a2V5a2V5a2V5a2V5a2V5a2V5",
    "scrypt$ln=40,r=8,p=1$c2FsdA$a2V5a2V5a2V5a2V5a2V5a2V5",      # absurd cost: refused
    "scrypt$ln=14,r=8,p=1$c2FsdA$a2V5",                          # key too short
    "scrypt$ln=x,r=8,p=1$c2FsdA$a2V5a2V5a2V5a2V5a2V5a2V5",
    "argon2id$v=19$m=65536,t=3,p=4$c2FsdA$a2V5",
    "{ARGON2ID}", "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$a2V5", "{ARGON2ID}$argon2id$ä", "{}x", "{",
    "{ARGON2ID}$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$a2V5a2V5a2V5a2V5a2V5a2V5",  # below argon2's minimum
])
def test_malformed_hashes_never_match_and_never_raise(encoded: str) -> None:
    assert verify_password(encoded, "pw") is False


def _key(plain: str, salt: bytes, log2_n: int, r: int, p: int) -> str:
    raw = hashlib.scrypt(plain.encode(), salt=salt, n=1 << log2_n, r=r, p=p, dklen=32)
    return base64.b64encode(raw).decode().rstrip("=")
