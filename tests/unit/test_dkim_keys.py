"""DKIM keys and their records (maildetour.sign.dkim_keys): `dkim keygen` makes RSA and
ed25519 keys without a traceback for bad input, and `dns check` tells one key from another. Issue 12.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import dkim
import pytest

from maildetour.sign.dkim import DkimSigner
from maildetour.sign.dkim_keys import (
    DkimKeyError,
    generate_ed25519_key,
    generate_key,
    public_key,
    published_key,
    same_key,
)

MESSAGE = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: keys\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
           b"Message-ID: <keys@example.com>\r\n\r\nHello.\r\n")


def test_an_ed25519_key_signs_and_its_printed_record_verifies(tmp_path: Path) -> None:
    path = tmp_path / "ed.key"
    record = generate_ed25519_key(path)
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", record)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(base64.b64decode(path.read_bytes().strip())) == 32  # the seed, as dkimpy's dknewkey writes it
    assert public_key(path, "ed25519").record == record

    rsa = tmp_path / "rsa.key"
    rsa_record = generate_key(rsa, 1024)
    signer = DkimSigner("example.com", "md1", rsa.read_bytes(), ed25519_key=("md1e", path.read_bytes().strip()))
    signed = signer.sign(MESSAGE) + MESSAGE
    records = {b"md1._domainkey.example.com.": rsa_record, b"md1e._domainkey.example.com.": record}
    for index in (0, 1):  # dkimpy checks one signature at a time: the RSA one, then the ed25519 one
        assert dkim.DKIM(signed).verify(idx=index, dnsfunc=lambda name, timeout=5: records[name].encode())


@pytest.mark.parametrize("bits", [512, 1023, 4097, 8192])
def test_rsa_key_lengths_outside_1024_to_4096_are_refused_before_anything_is_written(tmp_path: Path,
                                                                                     bits: int) -> None:
    with pytest.raises(DkimKeyError, match=r"1024 to 4096 bits"):
        generate_key(tmp_path / "k.pem", bits)
    assert not (tmp_path / "k.pem").exists()


def test_keys_are_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        generate_ed25519_key(path)
    with pytest.raises(FileExistsError):
        generate_key(path, 1024)
    assert path.read_text() == "precious"


def test_the_public_half_of_a_key_file_is_its_record_and_matches_either_der_form(tmp_path: Path) -> None:
    path = tmp_path / "rsa.key"
    record = generate_key(path, 1024)
    ours = public_key(path, "rsa")
    assert ours.record == record
    published = published_key(record.replace("; p=", ";  p = "))
    assert published is not None and same_key(published, ours)
    # The bare RSAPublicKey (PKCS#1) form some tools publish is the same key.
    bare = published_key("v=DKIM1; p=" + base64.b64encode(ours.data[22:]).decode())  # k= defaults to rsa
    assert bare is not None and same_key(bare, ours)
    other = published_key(generate_key(tmp_path / "other.key", 1024))
    assert other is not None and not same_key(other, ours)
    assert published_key("v=DKIM1; k=rsa; p=") is None  # revoked
    with pytest.raises(DkimKeyError):
        public_key(tmp_path / "rsa.key", "ed25519")
