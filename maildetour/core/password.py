"""Password hashes for mailbox logins, in a form Dovecot reads too.

Pure: no I/O apart from reading random bytes for the salt. Exposure: internal (the POP3 server
calls `verify_password` with what a client sent; `maildetour passwd` calls `hash_password`;
the config and `pop3.passwd_file` are checked with `hash_problem`).
Failure: `verify_password` never raises for bad input: a malformed, truncated or absurdly
expensive hash string simply does not match (False). Comparison is constant-time. An empty
password never matches, whatever the stored hash (even a hash of ""): a client that sends an
empty PASS gets in nowhere (issue 10 #10); the hash is still computed, so it takes as long.

Schemes (issue 12: one password list for maildetour's POP3 and Dovecot's IMAP):
- `{ARGON2ID}$argon2id$v=19$m=...,t=...,p=...$<salt>$<key>`: what `hash_password` makes. The
  PHC string of argon2-cffi behind Dovecot's scheme prefix, so the very same text goes into a
  Dovecot passwd-file (`doveadm pw -t` verifies it; Dovecot 2.3 verifies with libsodium).
  `{ARGON2I}` is verified too. Parameters: OWASP's argon2id minimum (19 MiB, t=2, p=1), about
  the cost of the scrypt hashes before (~30 ms here); p=1 keeps one login on one core.
- `scrypt$ln=14,r=8,p=1$<salt>$<key>`: our earlier format, still verified (Dovecot cannot read
  it). Salt and key in unpadded standard base64, `ln` is log2 of the CPU/memory cost N
  (scrypt's "interactive login" parameters, the same as Django's).
- `{PLAIN}text` and `{CLEARTEXT}text`: clear text, as Dovecot's passwd-file may hold it;
  verified (constant-time) but never made.
Other Dovecot schemes (SHA512-CRYPT, BLF-CRYPT, ...) are not verified: Python's `crypt` module
is deprecated (gone in 3.13) and no well-kept library does them; `hash_problem` names them so
the config check says which line to hash again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

import argon2.exceptions
from argon2 import extract_parameters
from argon2.low_level import Type, hash_secret, verify_secret

# scrypt$ as we made it before (issue 3), still verified.
_SCHEME = "scrypt"
_LOG2_N = 14
_R = 8
_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
# Refuse parameters that would need more than this much memory: a hash string is config input
# and must not be able to make a login take gigabytes.
_MAX_MEMORY = 256 * 1024 * 1024

# argon2id as we make it: OWASP's password storage minimum (m=19 MiB, t=2, p=1).
_ARGON2_TIME = 2
_ARGON2_MEMORY_KIB = 19 * 1024
_ARGON2_LANES = 1
# Refused in a stored argon2 hash (config input): beyond these one login would take seconds.
_ARGON2_MAX_TIME = 10
_ARGON2_MAX_LANES = 16
# Dovecot's scheme prefixes we verify (`{SCHEME}` before the hash), with the argon2 type each means.
_ARGON2_SCHEMES = {"ARGON2ID": Type.ID, "ARGON2I": Type.I}
_CLEAR_SCHEMES = ("PLAIN", "CLEARTEXT")


def hash_password(plain: str) -> str:
    """Hash `plain` with a fresh random salt, as `{ARGON2ID}$argon2id$...`: a string both
    maildetour and Dovecot verify, carrying its own parameters."""
    salt = secrets.token_bytes(_SALT_BYTES)
    encoded = hash_secret(plain.encode("utf-8"), salt, time_cost=_ARGON2_TIME, memory_cost=_ARGON2_MEMORY_KIB,
                          parallelism=_ARGON2_LANES, hash_len=_KEY_BYTES, type=Type.ID)
    return "{ARGON2ID}" + encoded.decode("ascii")


def hash_scrypt(plain: str) -> str:
    """Our earlier format, `scrypt$...` (kept for tests and for those who want it)."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _derive(plain.encode("utf-8"), salt, _LOG2_N, _R, _P, _KEY_BYTES)
    return f"{_SCHEME}$ln={_LOG2_N},r={_R},p={_P}${_b64(salt)}${_b64(key)}"


def hash_problem(encoded: str, *, clear_text: bool = False) -> str | None:
    """Why `encoded` cannot be verified (None when it can): an unknown scheme, a malformed
    string, parameters beyond our limits. `clear_text` allows `{PLAIN}`/`{CLEARTEXT}`."""
    scheme, rest = _dovecot_scheme(encoded)
    if scheme is None:
        if encoded.startswith(_SCHEME + "$"):
            return None if _scrypt_fields(encoded) is not None else "not a well-formed scrypt$ hash"
        return "expected {ARGON2ID}... (`maildetour passwd`, `doveadm pw -s ARGON2ID`) or scrypt$..."
    if scheme in _CLEAR_SCHEMES:
        return None if clear_text else f"{{{scheme}}} is clear text: use password = \"...\" instead"
    if scheme not in _ARGON2_SCHEMES:
        return (f"{{{scheme}}} is not a scheme maildetour verifies; hash it again with `maildetour passwd` "
                "or `doveadm pw -s ARGON2ID`")
    return None if _argon2_ok(rest, _ARGON2_SCHEMES[scheme]) else f"not a well-formed {{{scheme}}} hash"


def verify_password(encoded: str, plain: str) -> bool:
    """True when `plain` matches the hash `encoded`; False for a mismatch, a malformed hash,
    or an empty `plain`."""
    scheme, rest = _dovecot_scheme(encoded)
    if scheme in _CLEAR_SCHEMES:
        given = plain.encode("utf-8", "surrogatepass")
        return hmac.compare_digest(rest.encode("utf-8", "surrogatepass"), given) and plain != ""
    if scheme is not None:
        wanted = _ARGON2_SCHEMES.get(scheme)
        if wanted is None or not _argon2_ok(rest, wanted):
            return False
        try:
            matched = verify_secret(rest.encode("ascii"), plain.encode("utf-8", "surrogatepass"), wanted)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, ValueError,
                UnicodeError, MemoryError):
            return False
        return matched and plain != ""
    fields = _scrypt_fields(encoded)
    if fields is None:
        return False
    (log2_n, r, p), salt, key = fields
    try:
        candidate = _derive(plain.encode("utf-8", "surrogatepass"), salt, log2_n, r, p, len(key))
    except (ValueError, MemoryError, UnicodeError):
        return False
    return hmac.compare_digest(candidate, key) and plain != ""


def _dovecot_scheme(encoded: str) -> tuple[str | None, str]:
    """`{SCHEME}rest` -> ("SCHEME", "rest") with the scheme upper-cased, as Dovecot reads it;
    (None, encoded) without a prefix."""
    if encoded.startswith("{") and (end := encoded.find("}")) > 1:
        return encoded[1:end].upper(), encoded[end + 1:]
    return None, encoded


def _argon2_ok(phc: str, wanted: Type) -> bool:
    """A well-formed argon2 PHC string of type `wanted` within our cost limits."""
    if not phc.isascii():
        return False
    try:
        params = extract_parameters(phc)
    except (argon2.exceptions.InvalidHashError, ValueError):
        return False
    return (params.type is wanted and 1 <= params.time_cost <= _ARGON2_MAX_TIME
            and 1 <= params.parallelism <= _ARGON2_MAX_LANES
            and 8 * params.parallelism <= params.memory_cost <= _MAX_MEMORY // 1024
            and 16 <= params.hash_len <= 64 and params.salt_len >= 8)


def _scrypt_fields(encoded: str) -> tuple[tuple[int, int, int], bytes, bytes] | None:
    """(ln, r, p), salt, key of a well-formed `scrypt$` string within our limits, else None."""
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != _SCHEME:
        return None
    params = _parse_params(parts[1])
    salt = _unb64(parts[2])
    key = _unb64(parts[3])
    if params is None or salt is None or key is None or not salt or not 16 <= len(key) <= 64:
        return None
    return params, salt, key


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
