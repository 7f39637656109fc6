"""DKIM signatures for the copies we forward, and the key generator behind `dkim keygen`.

What it does: `DkimSigner.sign(message)` returns the DKIM-Signature header field(s) to put on
top of a message — rsa-sha256 always, plus an ed25519-sha256 signature when an ed25519 key is
configured (RFC 8463) — made by dkimpy with relaxed/relaxed canonicalisation over the usual
header fields (those present of `SIGNED_HEADERS`, and the ones in `OVERSIGNED_HEADERS` once
more so nobody can add a second one later). The message itself, and any signature it already
carries, are left untouched. Key generation and public records live in `sign.dkim_keys`
(`generate_key` is re-exported here for its older callers).

Contract: `sign` is pure apart from reading the clock for t= (inside dkimpy); CPU-bound (one
RSA signature, by OpenSSL: `sign.rsa_openssl`; a hash of the body), so callers on the event
loop run it in a thread for big messages.

Exposure: internal; the message bytes come from the internet but are only hashed.

Failure: a bad key or parameters raise `DkimKeyError` at construction (fail at start-up, not
per message); a message dkimpy cannot sign raises `DkimSignError`.
"""

from __future__ import annotations

import dkim
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

from maildetour.sign import rsa_openssl
from maildetour.sign.dkim_keys import MIN_RSA_BITS, DkimKeyError, generate_key

# dkimpy's RSA (DKIM here, ARC in `sign.arc`) by OpenSSL: 0.2 ms a signature instead of 5.6 ms
# of pure Python (issue 13); the same bytes.
rsa_openssl.install()

__all__ = [
    "DkimKeyError",
    "DkimSignError",
    "DkimSigner",
    "OVERSIGNED_HEADERS",
    "SIGNED_HEADERS",
    "generate_key",
    "line_separator",
]

# Signed when present. Trace and transport fields (Received, Return-Path, ARC-*, DKIM-*) are
# never signed: hops after us add or rewrite them.
SIGNED_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "in-reply-to", "references", "mime-version", "content-type", "content-transfer-encoding",
    "content-disposition", "list-id", "list-unsubscribe", "list-unsubscribe-post",
)
# Listed one extra time in h= (RFC 6376 8.15): a later added copy breaks the signature.
OVERSIGNED_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
)


class DkimSignError(Exception):
    """dkimpy could not sign this message."""


def line_separator(data: bytes) -> bytes:
    """The line ending a message uses (CRLF on the wire, LF in some files)."""
    end = data.find(b"\n")
    return b"\r\n" if end > 0 and data[end - 1 : end] == b"\r" else b"\n"


def _present_headers(data: bytes) -> list[bytes]:
    """Names (lowercase) of the header fields present, in order."""
    names: list[bytes] = []
    for line in data.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        if colon:
            names.append(name.strip().lower())
    return names


def _include_list(data: bytes) -> list[bytes]:
    """h= for this message: each present field of SIGNED_HEADERS as often as it occurs (From
    even when absent), then the oversigned ones once more: that empty extra instance in h=
    makes any field of that name added later break the signature."""
    present = _present_headers(data)
    listed: list[bytes] = []
    for name in (h.encode("ascii") for h in SIGNED_HEADERS):
        count = present.count(name)
        if count or name == b"from":
            listed.extend([name] * max(count, 1))
    oversigned = [h.encode("ascii") for h in OVERSIGNED_HEADERS]
    return listed + [name for name in oversigned if name in listed]


class DkimSigner:
    """Signs messages as `domain` with `selector` (RSA) and optionally a second ed25519 key
    given as `(selector, base64 private seed)`."""

    __slots__ = ("_domain", "_selector", "_rsa_key", "_ed25519")

    def __init__(
        self,
        domain: str,
        selector: str,
        private_key_pem: bytes,
        *,
        algorithm: str = "rsa-sha256",
        ed25519_key: tuple[str, bytes] | None = None,
    ) -> None:
        if algorithm != "rsa-sha256":  # rsa-sha1 must not be used for signing (RFC 8301)
            raise DkimKeyError(f"unsupported DKIM algorithm {algorithm!r}; use rsa-sha256")
        if not domain or not selector:
            raise DkimKeyError("DKIM needs a domain and a selector")
        try:
            key = parse_pem_private_key(private_key_pem)
        except (UnparsableKeyError, ValueError, IndexError) as exc:
            raise DkimKeyError(f"DKIM private key is not a PEM RSA key: {exc}") from exc
        if int(key["modulus"]).bit_length() < MIN_RSA_BITS:
            raise DkimKeyError(f"DKIM RSA key shorter than {MIN_RSA_BITS} bits")
        if ed25519_key is not None:
            _check_ed25519(ed25519_key[1])
        self._domain = domain.lower().encode("ascii")
        self._selector = selector.encode("ascii")
        self._rsa_key = private_key_pem
        self._ed25519 = (
            None if ed25519_key is None else (ed25519_key[0].encode("ascii"), ed25519_key[1])
        )

    def sign(self, data: bytes) -> bytes:
        """DKIM-Signature field(s), RSA first, each ending with the message's line ending."""
        linesep = line_separator(data)
        include = _include_list(data)
        fields = [self._sign_one(data, self._selector, self._rsa_key, b"rsa-sha256", include, linesep)]
        if self._ed25519 is not None:
            selector, key = self._ed25519
            fields.append(self._sign_one(data, selector, key, b"ed25519-sha256", include, linesep))
        return b"".join(fields)

    def _sign_one(
        self,
        data: bytes,
        selector: bytes,
        key: bytes,
        algorithm: bytes,
        include: list[bytes],
        linesep: bytes,
    ) -> bytes:
        try:
            signer = dkim.DKIM(data, signature_algorithm=algorithm, linesep=linesep)
            field = signer.sign(
                selector,
                self._domain,
                key,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
            )
        except dkim.DKIMException as exc:
            raise DkimSignError(f"DKIM signing failed: {exc}") from exc
        if not field.endswith(linesep):
            field += linesep
        return bytes(field)


def _check_ed25519(seed_b64: bytes) -> None:
    try:
        import nacl.encoding
        import nacl.signing
    except ImportError as exc:  # dkimpy signs ed25519 only with PyNaCl installed
        raise DkimKeyError("ed25519 DKIM signing needs PyNaCl (pip install pynacl)") from exc
    try:
        nacl.signing.SigningKey(seed_b64, encoder=nacl.encoding.Base64Encoder)
    except Exception as exc:  # PyNaCl raises several types for bad input
        raise DkimKeyError("ed25519 DKIM key must be the base64 32-byte private seed") from exc
