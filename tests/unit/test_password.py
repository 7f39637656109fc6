"""Password hashes for mailbox logins (maildetour.core.password). Issue 3."""

from __future__ import annotations

import base64
import hashlib

import pytest

from maildetour.core.password import hash_password, verify_password


def test_hash_is_self_describing_scrypt_with_a_random_salt() -> None:
    first, second = hash_password("change-me"), hash_password("change-me")
    assert first.startswith("scrypt$ln=14,r=8,p=1$")
    assert first != second  # fresh salt each time
    assert "change-me" not in first


def test_verify_accepts_the_right_password_only() -> None:
    encoded = hash_password("pä ss wörd")
    assert verify_password(encoded, "pä ss wörd")
    assert not verify_password(encoded, "pä ss word")
    assert not verify_password(encoded, "")


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
])
def test_malformed_hashes_never_match_and_never_raise(encoded: str) -> None:
    assert verify_password(encoded, "pw") is False


def _key(plain: str, salt: bytes, log2_n: int, r: int, p: int) -> str:
    raw = hashlib.scrypt(plain.encode(), salt=salt, n=1 << log2_n, r=r, p=p, dklen=32)
    return base64.b64encode(raw).decode().rstrip("=")
