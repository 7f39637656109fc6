"""Password hashes for mailbox logins: `scrypt$ln=14,r=8,p=1$<salt>$<key>`.

Pure: no I/O apart from reading random bytes for the salt. Exposure: internal (the POP3 server
calls `verify_password` with what a client sent; `maildetour passwd` calls `hash_password`).
Failure: `verify_password` never raises for bad input: a malformed, truncated or absurdly
expensive hash string simply does not match (False). Comparison is constant-time. An empty
password never matches, whatever the stored hash (even a hash of ""): a client that sends an
empty PASS gets in nowhere (issue 10 #10); the scrypt run is still made, so it takes as long.

Format: `scrypt` `$` parameters `$` salt `$` derived key, salt and key in unpadded standard
base64. `ln` is log2 of the CPU/memory cost N. The defaults are scrypt's "interactive login"
parameters (N=2^14, r=8, p=1: 16 MiB, ~60 ms here), the same as Django's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

_SCHEME = "scrypt"
_LOG2_N = 14
_R = 8
_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
# Refuse parameters that would need more than this much memory: a hash string is config input
# and must not be able to make a login take gigabytes.
_MAX_MEMORY = 256 * 1024 * 1024


def hash_password(plain: str) -> str:
    """Hash `plain` with a fresh random salt; the result carries its own parameters."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _derive(plain.encode("utf-8"), salt, _LOG2_N, _R, _P, _KEY_BYTES)
    return f"{_SCHEME}$ln={_LOG2_N},r={_R},p={_P}${_b64(salt)}${_b64(key)}"


def verify_password(encoded: str, plain: str) -> bool:
    """True when `plain` matches the hash `encoded`; False for a mismatch, a malformed hash,
    or an empty `plain`."""
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != _SCHEME:
        return False
    params = _parse_params(parts[1])
    salt = _unb64(parts[2])
    key = _unb64(parts[3])
    if params is None or salt is None or key is None or not salt or not 16 <= len(key) <= 64:
        return False
    log2_n, r, p = params
    try:
        candidate = _derive(plain.encode("utf-8", "surrogatepass"), salt, log2_n, r, p, len(key))
    except (ValueError, MemoryError, UnicodeError):
        return False
    return hmac.compare_digest(candidate, key) and plain != ""


def _derive(secret: bytes, salt: bytes, log2_n: int, r: int, p: int, length: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        secret, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=_memory(log2_n, r, p) + 1024 * 1024
    )


def _memory(log2_n: int, r: int, p: int) -> int:
    return 128 * r * ((1 << log2_n) + p + 2)


def _parse_params(text: str) -> tuple[int, int, int] | None:
    fields: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.isascii() or not value.isdigit() or len(value) > 4:
            return None
        fields[name] = int(value)
    if set(fields) != {"ln", "r", "p"}:
        return None
    log2_n, r, p = fields["ln"], fields["r"], fields["p"]
    if not (1 <= log2_n <= 24 and 1 <= r <= 64 and 1 <= p <= 16):
        return None
    if _memory(log2_n, r, p) > _MAX_MEMORY:
        return None
    return log2_n, r, p


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes | None:
    if not text.isascii():
        return None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
