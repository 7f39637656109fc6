"""DKIM signing and ARC sealing (issue 4), verified by dkimpy against an in-memory DNS."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest

from maildetour.sign.arc import ArcSealError, seal
from maildetour.sign.dkim import DkimKeyError, DkimSigner, generate_key
from maildetour.verify.dnsfunc import DnsTemporaryError

NOW = 1_795_440_000.0
MESSAGE = (
    b"From: Alice <alice@sender.example>\r\n"
    b"To: bob@fwd.example\r\n"
    b"Subject: lunch\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <lunch-1@sender.example>\r\n"
    b"\r\n"
    b"At noon?\r\n"
)

DnsFunc = Callable[..., bytes | None]


def in_memory_dns(records: dict[str, str]) -> DnsFunc:
    """dkimpy's dnsfunc over a dict: name (without final dot) -> TXT text."""

    def lookup(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        key = (name.decode() if isinstance(name, bytes) else name).rstrip(".").lower()
        text = records.get(key)
        return None if text is None else text.encode()

    return lookup


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, str]]:
    """Two RSA keys made by generate_key: name -> (PEM, TXT record)."""
    folder = tmp_path_factory.mktemp("keys")
    made = {}
    for name in ("fwd", "hop2"):
        txt = generate_key(folder / f"{name}.pem", 1024)  # 1024 keeps the test quick
        made[name] = ((folder / f"{name}.pem").read_bytes(), txt)
    return made


def test_generate_key_writes_a_private_pem_and_returns_the_txt_record(tmp_path: Path) -> None:
    path = tmp_path / "dkim.key"
    txt = generate_key(path, 1024)
    assert txt.startswith("v=DKIM1; k=rsa; p=MI")
    assert path.read_bytes().startswith(b"-----BEGIN ")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):  # a key is never overwritten
        generate_key(path, 1024)
    with pytest.raises(DkimKeyError):
        generate_key(tmp_path / "weak.key", 512)


def test_signature_verifies_with_dkimpy(keys: dict[str, tuple[bytes, str]]) -> None:
    pem, txt = keys["fwd"]
    signature = DkimSigner("fwd.example", "md1", pem).sign(MESSAGE)
    assert signature.startswith(b"DKIM-Signature: ") and signature.endswith(b"\r\n")
    assert b"c=relaxed/relaxed" in signature and b"d=fwd.example" in signature
    signed = signature + MESSAGE
    dns = in_memory_dns({"md1._domainkey.fwd.example": txt})
    assert dkim.verify(signed, dnsfunc=dns)
    # tampering with the body or an oversigned header breaks it
    assert not dkim.verify(signed.replace(b"At noon?", b"At one?"), dnsfunc=dns)
    wrong_key = in_memory_dns({"md1._domainkey.fwd.example": keys["hop2"][1]})
    assert not dkim.verify(signed, dnsfunc=wrong_key)
    added_from = signed.replace(b"\r\n\r\n", b"\r\nFrom: mallory@evil.example\r\n\r\n", 1)
    assert not dkim.verify(added_from, dnsfunc=dns)


def test_signed_headers_are_the_usual_set(keys: dict[str, tuple[bytes, str]]) -> None:
    signature = DkimSigner("fwd.example", "md1", keys["fwd"][0]).sign(MESSAGE)
    h_tag = dkim.util.parse_tag_value(signature.partition(b":")[2])[b"h"]
    names = [n.strip().lower() for n in h_tag.replace(b"\r\n", b"").split(b":")]
    for name in (b"from", b"to", b"subject", b"date", b"message-id"):
        assert names.count(name) == 2  # present once, listed twice: a second one cannot be added
    assert b"received" not in names and b"dkim-signature" not in names


def test_original_signature_stays_untouched_and_valid(keys: dict[str, tuple[bytes, str]]) -> None:
    original = DkimSigner("sender.example", "s", keys["hop2"][0]).sign(MESSAGE) + MESSAGE
    ours = DkimSigner("fwd.example", "md1", keys["fwd"][0]).sign(original)
    forwarded = ours + original
    assert forwarded.endswith(original)
    dns = in_memory_dns({"md1._domainkey.fwd.example": keys["fwd"][1], "s._domainkey.sender.example": keys["hop2"][1]})
    assert dkim.DKIM(forwarded).verify(0, dnsfunc=dns)
    assert dkim.DKIM(forwarded).verify(1, dnsfunc=dns)


def test_lf_only_messages_are_signed_with_lf(keys: dict[str, tuple[bytes, str]]) -> None:
    lf_message = MESSAGE.replace(b"\r\n", b"\n")
    signature = DkimSigner("fwd.example", "md1", keys["fwd"][0]).sign(lf_message)
    assert b"\r" not in signature
    assert dkim.verify(signature + lf_message, dnsfunc=in_memory_dns({"md1._domainkey.fwd.example": keys["fwd"][1]}))


def test_bad_keys_fail_at_construction() -> None:
    with pytest.raises(DkimKeyError):
        DkimSigner("fwd.example", "md1", b"not a key")
    with pytest.raises(DkimKeyError):
        DkimSigner("fwd.example", "md1", b"-----BEGIN X-----\nAAAA\n-----END X-----\n")
    with pytest.raises(DkimKeyError):
        DkimSigner("fwd.example", "md1", b"", algorithm="rsa-sha1")


def test_ed25519_second_signature(keys: dict[str, tuple[bytes, str]]) -> None:
    signing = pytest.importorskip("nacl.signing")
    encoding = pytest.importorskip("nacl.encoding")
    key = signing.SigningKey.generate()
    seed = key.encode(encoder=encoding.Base64Encoder)
    public = key.verify_key.encode(encoder=encoding.Base64Encoder).decode()
    signer = DkimSigner("fwd.example", "md1", keys["fwd"][0], ed25519_key=("ed1", seed))
    signed = signer.sign(MESSAGE) + MESSAGE
    dns = in_memory_dns({
        "md1._domainkey.fwd.example": keys["fwd"][1],
        "ed1._domainkey.fwd.example": f"v=DKIM1; k=ed25519; p={public}",
    })
    assert signed.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in signed.split(b"DKIM-Signature:")[1]  # RSA on top for old verifiers
    assert dkim.DKIM(signed).verify(0, dnsfunc=dns)
    assert dkim.DKIM(signed).verify(1, dnsfunc=dns)


# -- ARC --------------------------------------------------------------------------------------


def _seal(message: bytes, keys: dict[str, tuple[bytes, str]], hop: str, results: str, dns: DnsFunc) -> bytes:
    return seal(
        message,
        domain=f"{hop}.example",
        selector="arc",
        private_key_pem=keys[hop][0],
        authserv_id=f"mx.{hop}.example",
        results=results,
        now=NOW,
        dnsfunc=dns,
    )


def _arc_dns(keys: dict[str, tuple[bytes, str]]) -> DnsFunc:
    return in_memory_dns({f"arc._domainkey.{hop}.example": keys[hop][1] for hop in ("fwd", "hop2")})


def test_first_arc_set_has_instance_1_cv_none_and_our_verdicts(keys: dict[str, tuple[bytes, str]]) -> None:
    dns = _arc_dns(keys)
    fields = _seal(MESSAGE, keys, "fwd", "mx.fwd.example; spf=pass smtp.mailfrom=alice@sender.example", dns)
    lines = fields.split(b"\r\n")
    assert lines[0].startswith(b"ARC-Seal: i=1; cv=none;")
    assert fields.count(b"ARC-Message-Signature: i=1;") == 1
    assert b"ARC-Authentication-Results: i=1; mx.fwd.example;" in fields
    assert b"spf=pass smtp.mailfrom=alice@sender.example" in fields
    assert dkim.arc_verify(fields + MESSAGE, dnsfunc=dns)[0] == b"pass"


def test_message_forwarded_twice_carries_a_passing_two_instance_chain(keys: dict[str, tuple[bytes, str]]) -> None:
    dns = _arc_dns(keys)
    once = _seal(MESSAGE, keys, "fwd", "mx.fwd.example; spf=pass smtp.mailfrom=alice@sender.example", dns) + MESSAGE
    twice = _seal(once, keys, "hop2", "mx.hop2.example; spf=fail smtp.mailfrom=x@fwd.example", dns) + once
    cv, results, _reason = dkim.arc_verify(twice, dnsfunc=dns)
    assert cv == b"pass"
    assert [r["instance"] for r in results] == [2, 1]
    assert b"ARC-Seal: i=2; cv=pass;" in twice
    assert b"arc=pass" in twice.split(b"ARC-Authentication-Results: i=2;")[1].split(b"\r\n\r\n")[0]


def test_broken_chain_is_continued_with_cv_fail(keys: dict[str, tuple[bytes, str]]) -> None:
    dns = _arc_dns(keys)
    once = _seal(MESSAGE, keys, "fwd", "mx.fwd.example; spf=pass smtp.mailfrom=alice@sender.example", dns) + MESSAGE
    tampered = once.replace(b"At noon?", b"At one?")
    fields = _seal(tampered, keys, "hop2", "mx.hop2.example; spf=pass smtp.mailfrom=x@fwd.example", dns)
    assert fields.startswith(b"ARC-Seal: i=2; cv=fail;")


def test_incoming_results_claiming_our_id_do_not_reach_the_aar(keys: dict[str, tuple[bytes, str]]) -> None:
    forged = b"Authentication-Results: MX.FWD.example; dkim=pass header.d=bank.example\r\n" + MESSAGE
    fields = _seal(forged, keys, "fwd", "mx.fwd.example; spf=softfail smtp.mailfrom=alice@sender.example", _arc_dns(keys))
    assert b"bank.example" not in fields
    assert b"spf=softfail" in fields


def test_results_under_another_authserv_id_are_refused(keys: dict[str, tuple[bytes, str]]) -> None:
    with pytest.raises(ValueError):
        _seal(MESSAGE, keys, "fwd", "mx.other.example; spf=pass", _arc_dns(keys))


def test_message_without_from_is_an_error_not_an_empty_seal(keys: dict[str, tuple[bytes, str]]) -> None:
    no_from = b"".join(line for line in MESSAGE.splitlines(keepends=True) if not line.startswith(b"From:"))
    with pytest.raises(ArcSealError) as raised:
        _seal(no_from, keys, "fwd", "mx.fwd.example; spf=pass", _arc_dns(keys))
    assert not raised.value.temporary


def test_dns_failure_while_validating_the_chain_is_temporary(keys: dict[str, tuple[bytes, str]]) -> None:
    dns = _arc_dns(keys)
    once = _seal(MESSAGE, keys, "fwd", "mx.fwd.example; spf=pass", dns) + MESSAGE

    def failing(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        raise DnsTemporaryError("timeout")

    with pytest.raises(ArcSealError) as raised:
        _seal(once, keys, "hop2", "mx.hop2.example; spf=pass", failing)
    assert raised.value.temporary
