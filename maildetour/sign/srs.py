"""Sender Rewriting Scheme: envelope senders of forwarded copies rewritten to our domain.

What it does: `SrsCodec.forward` turns the original MAIL FROM of a forwarded copy into an
address at our domain (SRS0, or SRS1 when the sender is already an SRS0/SRS1 address of
another forwarder), so SPF at the next hop checks *our* IP; `SrsCodec.reverse` turns a bounce
address back into the original sender, or says precisely why it refuses. The format is the
one of libsrs2 / postsrsd 1.x (HMAC-SHA1 over the lowercased fields, standard base64 of the
digest truncated; timestamp = day number mod 1024 in two base32 characters), so postsrsd
reverses our addresses and we reverse postsrsd's.

Contract: pure — no I/O except `load_secrets` and `make_secret_file`, no clock (callers pass
`now` in seconds).
Where we are stricter than libsrs2: a hash longer than `hash_length` is checked in full (libsrs2
checks only its first `hash_length` characters), and a hash shorter than `hash_length` (or than
4 characters) is refused: with our default of 8 characters a forged address takes about 2^40
guesses (base64 compared without case), not 2^20. Where we are more lenient: a timestamp one day in the future is
accepted (clock skew between nodes around midnight). The hash is compared case-insensitively
(in constant time), as libsrs2 does, because relays lowercase whole addresses.

Exposure: faces the internet indirectly — `reverse` decides whether a RCPT to an SRS address
is accepted, so a forged or expired address must be refused here (caller answers 550 5.1.1).

Failure: `reverse` returns an `SrsError` value (never raises) for any bad input; `forward` and
the constructor raise `ValueError` for a caller bug (sender without '@', no secrets);
`load_secrets` raises `SrsSecretError` naming the file.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from maildetour.durable import fsync_dir, write_synced

__all__ = [
    "SrsCodec",
    "SrsError",
    "SrsErrorKind",
    "SrsSecretError",
    "is_srs",
    "load_secrets",
    "make_secret_file",
]

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_DAY = 86400
_TIME_SLOTS = 1024  # two base32 characters: day number modulo 1024
_SEP = "="  # separator between fields (SRSSEP of libsrs2)
_FIRST_SEPARATORS = "=+-"  # allowed right after "SRS0"/"SRS1"
_MIN_HASH = 4  # shortest hash accepted on input: 4 chars ~ 20 bits after case folding
_MAX_HASH = 27  # base64 of a SHA-1 digest without padding
_FUTURE_SKEW_DAYS = 1  # a stamp this many days ahead is still valid (clock skew)


class SrsErrorKind(enum.Enum):
    NOT_SRS = "not an SRS address"
    MALFORMED = "malformed SRS address"
    HASH_TOO_SHORT = "hash too short"
    BAD_HASH = "hash does not verify"
    BAD_TIMESTAMP = "malformed timestamp"
    EXPIRED = "timestamp expired"


@dataclass(frozen=True, slots=True)
class SrsError:
    """Why an address could not be reversed. `kind` is for code, `detail` for logs."""

    kind: SrsErrorKind
    detail: str = ""


class SrsSecretError(ValueError):
    """The secret file is missing, unreadable or holds no secret."""


def make_secret_file(path: Path) -> bool:
    """Create `path` holding one new random secret, as postsrsd's installers make theirs (18
    random bytes, base64, one line), mode 0600, fsync'ed with its directory entry. An existing
    file is never touched: returns False then, True when it was made."""
    try:
        write_synced(path, base64.b64encode(os.urandom(18)) + b"\n", mode=0o600)
    except FileExistsError:
        return False
    fsync_dir(path.parent)
    return True


def load_secrets(path: Path | str) -> tuple[bytes, ...]:
    """Read SRS secrets, one per line; the first signs, all verify. Blank lines are skipped."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SrsSecretError(f"cannot read SRS secret file {path}: {exc.strerror}") from exc
    secrets = tuple(line.rstrip(b"\r") for line in raw.split(b"\n") if line.strip())
    if not secrets:
        raise SrsSecretError(f"SRS secret file {path} holds no secret (one per line)")
    return secrets


def is_srs(address: str) -> bool:
    """True when the local part looks like SRS0/SRS1 (any case), whatever its hash."""
    local = address.rpartition("@")[0] if "@" in address else address
    return len(local) > 4 and local[:4].upper() in ("SRS0", "SRS1") and local[4] in _FIRST_SEPARATORS


@dataclass(frozen=True, slots=True)
class _Srs0:
    hash: str
    stamp: str
    domain: str
    local: str


@dataclass(frozen=True, slots=True)
class _Srs1:
    hash: str
    host: str
    opaque: str  # the SRS0 local part without "SRS0", starting with its separator


def _split_srs0(body: str) -> _Srs0 | None:
    """`body` is what follows "SRS0" and its separator: HASH=TT=domain=local."""
    parts = body.split(_SEP, 3)
    if len(parts) != 4 or not all(parts):
        return None
    return _Srs0(hash=parts[0], stamp=parts[1], domain=parts[2], local=parts[3])


def _split_srs1(body: str) -> _Srs1 | None:
    """`body` is what follows "SRS1" and its separator: HASH=host=<sep>opaque."""
    parts = body.split(_SEP, 2)
    if len(parts) != 3 or not parts[0] or not parts[1] or len(parts[2]) < 2:
        return None
    if parts[2][0] not in _FIRST_SEPARATORS:
        return None
    return _Srs1(hash=parts[0], host=parts[1], opaque=parts[2])


class SrsCodec:
    """Forward and reverse SRS addresses at `domain` with `secrets` (the first one signs)."""

    __slots__ = ("_secrets", "_domain", "_max_age_days", "_hash_length")

    def __init__(
        self,
        secrets: Sequence[bytes | str],
        domain: str,
        *,
        max_age_days: int = 21,
        hash_length: int = 4,
    ) -> None:
        keys = tuple(s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in secrets)
        if not keys or not all(keys):
            raise ValueError("SRS needs at least one non-empty secret")
        if not _MIN_HASH <= hash_length <= _MAX_HASH:
            raise ValueError(f"SRS hash_length must be {_MIN_HASH}..{_MAX_HASH}, not {hash_length}")
        if not 1 <= max_age_days < _TIME_SLOTS - _FUTURE_SKEW_DAYS:
            raise ValueError(f"SRS max_age_days out of range: {max_age_days}")
        if not domain or "@" in domain:
            raise ValueError(f"SRS domain is not a domain: {domain!r}")
        self._secrets = keys
        self._domain = domain.lower().rstrip(".")
        self._max_age_days = max_age_days
        self._hash_length = hash_length

    @property
    def domain(self) -> str:
        return self._domain

    # -- forward ---------------------------------------------------------------------------

    def forward(self, sender: str, now: float) -> str:
        """The envelope sender for a copy we forward. "" stays ""; our own domain is kept."""
        if sender == "":
            return ""
        local, at, domain = sender.rpartition("@")
        if not at or not local or not domain:
            raise ValueError("cannot rewrite a sender without local part and domain")
        if domain.lower().rstrip(".") == self._domain:
            return sender
        if is_srs(sender):
            tag, first_sep, body = local[:4].upper(), local[4], local[5:]
            if tag == "SRS1":
                srs1 = _split_srs1(body)
                if srs1 is not None:  # keep the first hop, re-sign under our domain
                    return self._srs1(srs1.host, srs1.opaque)
            elif _split_srs0(body) is not None:
                return self._srs1(domain, first_sep + body)
            # looks like SRS but is not: rewrite it as an ordinary address below
        stamp = _stamp(now)
        digest = self._hash(self._secrets[0], stamp, domain, local)
        return f"SRS0{_SEP}{digest}{_SEP}{stamp}{_SEP}{domain}{_SEP}{local}@{self._domain}"

    def _srs1(self, host: str, opaque: str) -> str:
        digest = self._hash(self._secrets[0], host, opaque)
        return f"SRS1{_SEP}{digest}{_SEP}{host}{_SEP}{opaque}@{self._domain}"

    def _hash(self, secret: bytes, *fields: str, length: int | None = None) -> str:
        mac = hmac.new(secret, digestmod=hashlib.sha1)
        for field in fields:
            mac.update(field.encode("utf-8").lower())  # bytes.lower(): ASCII only, as libsrs2
        return base64.b64encode(mac.digest()).decode("ascii")[: length or self._hash_length]

    # -- reverse ---------------------------------------------------------------------------

    def reverse(self, address: str, now: float) -> str | SrsError:
        """The address a bounce to `address` must go to, or why it must be refused."""
        local = address.rpartition("@")[0] if "@" in address else address
        if not is_srs(address):
            return SrsError(SrsErrorKind.NOT_SRS)
        tag, body = local[:4].upper(), local[5:]  # any of =+- may follow the tag (libsrs2)
        if tag == "SRS1":
            srs1 = _split_srs1(body)
            if srs1 is None:
                return SrsError(SrsErrorKind.MALFORMED, "SRS1 needs HASH=host=opaque")
            problem = self._check_hash(srs1.hash, srs1.host, srs1.opaque)
            if problem is not None:
                return problem
            return f"SRS0{srs1.opaque}@{srs1.host}"
        srs0 = _split_srs0(body)
        if srs0 is None:
            return SrsError(SrsErrorKind.MALFORMED, "SRS0 needs HASH=TT=domain=local")
        problem = self._check_hash(srs0.hash, srs0.stamp, srs0.domain, srs0.local)
        if problem is not None:
            return problem
        problem = self._check_stamp(srs0.stamp, now)
        if problem is not None:
            return problem
        return f"{srs0.local}@{srs0.domain}"

    def _check_hash(self, given: str, *fields: str) -> SrsError | None:
        if len(given) < max(_MIN_HASH, self._hash_length):
            return SrsError(SrsErrorKind.HASH_TOO_SHORT, f"{len(given)} characters")
        if len(given) > _MAX_HASH:
            return SrsError(SrsErrorKind.BAD_HASH, "longer than a SHA-1 digest")
        wanted = given.lower().encode("utf-8")
        matched = False
        for secret in self._secrets:  # no early exit: same work whichever secret matches
            expected = self._hash(secret, *fields, length=len(given)).lower().encode("ascii")
            matched |= hmac.compare_digest(expected, wanted)
        return None if matched else SrsError(SrsErrorKind.BAD_HASH)

    def _check_stamp(self, stamp: str, now: float) -> SrsError | None:
        then = _decode_stamp(stamp)
        if then is None:
            return SrsError(SrsErrorKind.BAD_TIMESTAMP, stamp)
        age = (_day(now) - then) % _TIME_SLOTS
        if age <= self._max_age_days or age >= _TIME_SLOTS - _FUTURE_SKEW_DAYS:
            return None
        return SrsError(SrsErrorKind.EXPIRED, f"{age} days old")


def _day(now: float) -> int:
    return int(now // _DAY) % _TIME_SLOTS


def _stamp(now: float) -> str:
    day = _day(now)
    return _BASE32[day >> 5] + _BASE32[day & 31]


def _decode_stamp(stamp: str) -> int | None:
    if len(stamp) != 2:
        return None
    high, low = _BASE32.find(stamp[0].upper()), _BASE32.find(stamp[1].upper())
    if high < 0 or low < 0:
        return None
    return high << 5 | low
