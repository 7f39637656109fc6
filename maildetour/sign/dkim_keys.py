"""DKIM keys: making them (`maildetour dkim keygen`) and their public halves (the TXT records).

What it does: `generate_key` writes a new RSA private key (PEM) and `generate_ed25519_key` a
new ed25519 key (the base64 32-byte seed dkimpy signs with, RFC 8463), each returning the TXT
record to publish at `<selector>._domainkey.<domain>`. `public_key` reads a configured key
file and gives its public half (`PublicKey.record` is the TXT text); `published_key` reads a
TXT record found in DNS; `same_key` tells whether the two are one key (`maildetour dns check`).

Contract: a new key file is created with mode 0600 and fsync'ed, never over an existing file.
RSA keys are made by the `openssl` binary (as before; no extra Python dependency), ed25519
keys by PyNaCl, the library dkimpy signs ed25519 with (dkimpy's own `dknewkey` does the same).
Exposure: operator-facing (key files of the config; records from our own DNS).

Failure: `DkimKeyError` (a ValueError) with a one-line reason for a bit count outside
1024..4096, a file that holds no usable key, a missing PyNaCl or a failing openssl;
`FileExistsError` rather than overwrite a key; OSError for other file trouble.
"""

from __future__ import annotations

import base64
import binascii
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from dkim.crypto import UnparsableKeyError, parse_pem_private_key, parse_public_key

__all__ = ["DkimKeyError", "MAX_RSA_BITS", "MIN_RSA_BITS", "PublicKey", "check_rsa_bits",
           "generate_ed25519_key", "generate_key", "public_key", "published_key", "same_key"]

MIN_RSA_BITS = 1024  # RFC 8301: verifiers must refuse shorter keys; 2048 is the default
MAX_RSA_BITS = 4096  # RFC 8301: verifiers need not take longer ones
OPENSSL_TIMEOUT = 60.0  # seconds; key generation of 4096 bits takes a few seconds


class DkimKeyError(ValueError):
    """A signing key or signer parameter is unusable."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    algorithm: str  # "rsa" | "ed25519" (the record's k=)
    data: bytes  # rsa: DER SubjectPublicKeyInfo (or a bare RSAPublicKey as published); ed25519: 32 bytes

    @property
    def record(self) -> str:
        """The TXT record text to publish."""
        return f"v=DKIM1; k={self.algorithm}; p=" + base64.b64encode(self.data).decode("ascii")


def check_rsa_bits(bits: int) -> None:
    """Raise DkimKeyError unless `bits` is a usable RSA key length for DKIM."""
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise DkimKeyError(f"--bits {bits}: DKIM RSA keys are {MIN_RSA_BITS} to {MAX_RSA_BITS} bits "
                           "(RFC 8301: verifiers refuse shorter ones and need not take longer ones)")


def generate_key(path: Path, bits: int = 2048) -> str:
    """Write a new RSA private key (PEM, mode 0600) to `path`; return the DNS TXT record."""
    check_rsa_bits(bits)
    if path.exists():
        raise FileExistsError(f"{path} exists")
    pem = _openssl(["genrsa", str(bits)], b"")
    record = _rsa_public(pem).record
    _write_new(path, pem)
    return record


def generate_ed25519_key(path: Path) -> str:
    """Write a new ed25519 key (the base64 seed, mode 0600) to `path`; return the TXT record."""
    signing = _nacl()
    seed = os.urandom(32)
    public = bytes(signing.SigningKey(seed).verify_key)
    _write_new(path, base64.b64encode(seed) + b"\n")
    return PublicKey("ed25519", public).record


def public_key(path: Path, algorithm: str) -> PublicKey:
    """The public half of the private key in `path` ("rsa": PEM; "ed25519": base64 seed)."""
    data = path.read_bytes()
    if algorithm == "ed25519":
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except binascii.Error:
            seed = b""
        if len(seed) != 32:
            raise DkimKeyError(f"{path}: not an ed25519 key (the base64 32-byte seed)")
        return PublicKey("ed25519", bytes(_nacl().SigningKey(seed).verify_key))
    try:
        parse_pem_private_key(data)
    except (UnparsableKeyError, ValueError, IndexError) as exc:
        raise DkimKeyError(f"{path}: not a PEM RSA key") from exc
    return _rsa_public(data)


def published_key(record: str) -> PublicKey | None:
    """The key of a DKIM TXT record (`k=`, default rsa; `p=`), or None without a usable `p=`
    (an empty `p=` is a revoked key)."""
    tags: dict[str, str] = {}
    for item in record.split(";"):
        name, sep, value = item.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(value.split())
    try:
        data = base64.b64decode(tags.get("p", ""), validate=True)
    except binascii.Error:
        return None
    return PublicKey(tags.get("k", "rsa").lower(), data) if data else None


def same_key(published: PublicKey, ours: PublicKey) -> bool:
    """One key? RSA keys are compared by modulus and exponent (a record may hold the key as
    SubjectPublicKeyInfo or as a bare RSAPublicKey), ed25519 keys by their 32 bytes."""
    if published.algorithm != ours.algorithm:
        return False
    if ours.algorithm != "rsa":
        return published.data == ours.data
    try:
        return bool(parse_public_key(published.data) == parse_public_key(ours.data))
    except (UnparsableKeyError, ValueError, IndexError):
        return False


def _rsa_public(pem: bytes) -> PublicKey:
    return PublicKey("rsa", _openssl(["rsa", "-pubout", "-outform", "DER"], pem))


def _nacl() -> ModuleType:
    try:
        import nacl.signing
    except ImportError as exc:  # dkimpy signs ed25519 only with PyNaCl installed
        raise DkimKeyError("ed25519 DKIM keys need PyNaCl (pip install pynacl)") from exc
    return nacl.signing


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _openssl(args: list[str], stdin: bytes) -> bytes:
    try:
        done = subprocess.run(
            ["openssl", *args], input=stdin, capture_output=True, timeout=OPENSSL_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DkimKeyError(f"cannot run openssl: {exc}") from exc
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise DkimKeyError(f"openssl {args[0]} failed: {message[-1] if message else done.returncode}")
    return done.stdout
