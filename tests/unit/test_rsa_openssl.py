"""`sign.rsa_openssl`: dkimpy's RSA signatures made by OpenSSL are the very bytes dkimpy's own
pure-Python function makes (PKCS#1 v1.5 is deterministic), and dkimpy uses it once installed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dkim
from dkim.crypto import parse_pem_private_key

from maildetour.sign import rsa_openssl
from maildetour.sign.dkim import DkimSigner
from maildetour.sign.dkim_keys import generate_key


def test_openssl_makes_the_bytes_dkimpy_makes(tmp_path: Path) -> None:
    generate_key(tmp_path / "k.pem", 2048)
    key = parse_pem_private_key((tmp_path / "k.pem").read_bytes())
    assert rsa_openssl._PURE_PYTHON is not None
    for algorithm in (hashlib.sha256, hashlib.sha1):
        for text in (b"", b"a message", bytes(range(256)) * 40):
            assert rsa_openssl.sign(algorithm(text), key) == rsa_openssl._PURE_PYTHON(algorithm(text), key)


def test_dkimpy_signs_through_openssl_and_the_signature_verifies(tmp_path: Path) -> None:
    assert dkim.RSASSA_PKCS1_v1_5_sign is rsa_openssl.sign  # importing sign.dkim installed it
    record = generate_key(tmp_path / "k.pem", 2048).encode()
    signer = DkimSigner("example.com", "s1", (tmp_path / "k.pem").read_bytes())
    message = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
    signed = signer.sign(message) + message
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)


def test_an_unknown_hash_is_left_to_dkimpy(tmp_path: Path) -> None:
    generate_key(tmp_path / "k.pem", 2048)
    key = parse_pem_private_key((tmp_path / "k.pem").read_bytes())
    digest = hashlib.sha512(b"x")
    try:
        theirs: bytes | Exception = rsa_openssl._PURE_PYTHON(digest, key)  # type: ignore[misc]
    except Exception as exc:  # dkimpy knows no sha512 DigestInfo: whatever it does, we do
        theirs = exc
    try:
        ours: bytes | Exception = rsa_openssl.sign(digest, key)
    except Exception as exc:
        ours = exc
    assert type(ours) is type(theirs) and (not isinstance(ours, bytes) or ours == theirs)
