"""RSA signatures for dkimpy made by OpenSSL (through `cryptography`) instead of Python's pow().

What: dkimpy (1.1) signs rsa-sha256 with its own PKCS#1 v1.5 code, whose modular exponent is
Python's built-in `pow()`: about 5.6 ms for a 2048-bit key, and a copy we sign carries three
(DKIM-Signature, ARC-Message-Signature, ARC-Seal), all holding the GIL. OpenSSL makes one in
about 0.2 ms. `install()` puts `sign` in the place dkimpy looks the function up
(`dkim.RSASSA_PKCS1_v1_5_sign`, a module global that `DKIM.sign` and `ARC.sign` call). PKCS#1
v1.5 signatures are deterministic, so the bytes are exactly those dkimpy would have made (a
test checks this against dkimpy's own function).

Contract: same arguments and result as dkimpy's function (a hash object, dkimpy's parsed key
dict; the signature bytes). Keys are turned into OpenSSL key objects once (cached by their
numbers). Failure: a hash other than sha256/sha1 or a key dict that is not dkimpy's shape is
handed to dkimpy's own function, which raises as before. If a future dkimpy no longer has the
global, `install` leaves dkimpy as it is and returns False (signing then works, only slower).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}
_KEY_FIELDS = ("modulus", "publicExponent", "privateExponent", "prime1", "prime2", "exponent1",
               "exponent2", "coefficient")
_PURE_PYTHON: Callable[[Any, dict[str, int]], bytes] | None = getattr(dkim, "RSASSA_PKCS1_v1_5_sign", None)


@functools.lru_cache(maxsize=16)
def _key(n: int, e: int, d: int, p: int, q: int, dp: int, dq: int, qi: int) -> rsa.RSAPrivateKey:
    return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)).private_key()


def sign(hash_: Any, key: dict[str, int]) -> bytes:
    """dkimpy's `RSASSA_PKCS1_v1_5_sign(hash, private_key)`, by OpenSSL."""
    algorithm = _HASHES.get(getattr(hash_, "name", ""))
    if algorithm is None or not all(name in key for name in _KEY_FIELDS):
        assert _PURE_PYTHON is not None
        return _PURE_PYTHON(hash_, key)
    private = _key(*(key[name] for name in _KEY_FIELDS))
    return private.sign(hash_.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))


def install() -> bool:
    """Make dkimpy sign RSA by OpenSSL; True when it now does."""
    if _PURE_PYTHON is None:
        return False
    dkim.RSASSA_PKCS1_v1_5_sign = sign
    return True
