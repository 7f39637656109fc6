"""SRS codec (issue 4): what forward produces, what reverse accepts and what it refuses."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from maildetour.sign.srs import SrsCodec, SrsError, SrsErrorKind, SrsSecretError, is_srs, load_secrets

DAY = 86400.0
NOW = 1_795_440_000.0  # a fixed instant; every test passes its own clock
OURS = "fwd.example"


def codec(*secrets: str, **kw: int) -> SrsCodec:
    return SrsCodec(secrets or ("s3cret",), OURS, **kw)


def reversed_ok(result: str | SrsError) -> str:
    assert isinstance(result, str), result
    return result


def kind(result: str | SrsError) -> SrsErrorKind:
    assert isinstance(result, SrsError), result
    return result.kind


# -- forward ----------------------------------------------------------------------------------


def test_srs0_has_the_libsrs2_layout_and_hash() -> None:
    address = codec().forward("Alice@Sender.example", NOW)
    local, _, domain = address.partition("@")
    tag, digest, stamp, orig_domain, orig_local = local.split("=")
    assert (tag, domain, orig_domain, orig_local) == ("SRS0", OURS, "Sender.example", "Alice")
    day = int(NOW // DAY) % 1024
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    assert stamp == alphabet[day >> 5] + alphabet[day & 31]
    # HMAC-SHA1 over the lowercased stamp+domain+local, standard base64, 4 characters
    mac = hmac.new(b"s3cret", (stamp + "sender.example" + "alice").lower().encode(), hashlib.sha1)
    assert digest == base64.b64encode(mac.digest()).decode()[:4]


def test_round_trip_keeps_the_original_sender_exactly() -> None:
    c = codec()
    for sender in ("alice@sender.example", "Bob.Smith+tag@Mail.Sender.example", "a=b@sender.example"):
        assert reversed_ok(c.reverse(c.forward(sender, NOW), NOW)) == sender


def test_null_sender_stays_null() -> None:
    assert codec().forward("", NOW) == ""


def test_sender_at_our_own_domain_is_not_rewritten() -> None:
    assert codec().forward("postmaster@FWD.example", NOW) == "postmaster@FWD.example"


def test_sender_without_domain_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        codec().forward("postmaster", NOW)


def test_srs0_of_another_forwarder_becomes_srs1_keeping_the_first_hop() -> None:
    first = SrsCodec(["other"], "first.example")
    srs0 = first.forward("alice@sender.example", NOW)
    srs1 = codec().forward(srs0, NOW)
    local = srs1.partition("@")[0]
    assert srs1.endswith("@" + OURS)
    assert local.startswith("SRS1=")
    assert local.split("=")[2] == "first.example"
    opaque = srs0.partition("@")[0][4:]  # "=HHHH=TT=sender.example=alice"
    assert local.endswith("=first.example=" + opaque)
    # reversing ours gives the first forwarder's SRS0 back, which that forwarder reverses
    back = reversed_ok(codec().reverse(srs1, NOW))
    assert back == srs0
    assert reversed_ok(first.reverse(back, NOW)) == "alice@sender.example"


def test_srs1_forwarded_again_keeps_the_first_hop_and_is_resigned() -> None:
    first, second = SrsCodec(["a"], "first.example"), SrsCodec(["b"], "second.example")
    srs1_second = second.forward(first.forward("alice@sender.example", NOW), NOW)
    srs1_ours = codec().forward(srs1_second, NOW)
    assert srs1_ours.endswith("@" + OURS)
    assert srs1_ours.partition("@")[0].split("=")[2] == "first.example"
    assert srs1_ours.split("=", 2)[1] != srs1_second.split("=", 2)[1]  # our hash, not theirs
    # a bounce to it goes straight back to the first forwarder, skipping the second
    assert reversed_ok(codec().reverse(srs1_ours, NOW)) == first.forward("alice@sender.example", NOW)


# -- reverse: what is refused -----------------------------------------------------------------


def test_reverse_is_case_insensitive_because_relays_lowercase_addresses() -> None:
    c = codec()
    address = c.forward("Alice@Sender.example", NOW)
    assert reversed_ok(c.reverse(address.lower(), NOW)).lower() == "alice@sender.example"
    assert reversed_ok(c.reverse(address.upper(), NOW)).lower() == "alice@sender.example"


def test_timestamp_is_valid_for_max_age_days_then_expires() -> None:
    c = codec()
    address = c.forward("alice@sender.example", NOW)
    assert reversed_ok(c.reverse(address, NOW + 21 * DAY)) == "alice@sender.example"
    assert kind(c.reverse(address, NOW + 22 * DAY)) is SrsErrorKind.EXPIRED
    assert kind(codec(max_age_days=3).reverse(address, NOW + 4 * DAY)) is SrsErrorKind.EXPIRED


def test_timestamp_a_day_ahead_is_tolerated_further_is_not() -> None:
    c = codec()
    assert isinstance(c.reverse(c.forward("a@sender.example", NOW + DAY), NOW), str)
    assert kind(c.reverse(c.forward("a@sender.example", NOW + 2 * DAY), NOW)) is SrsErrorKind.EXPIRED


def test_hash_shorter_than_four_characters_is_refused_even_if_it_matches() -> None:
    c = codec()
    tag, digest, rest = c.forward("alice@sender.example", NOW).split("=", 2)
    assert kind(c.reverse(f"{tag}={digest[:3]}={rest}", NOW)) is SrsErrorKind.HASH_TOO_SHORT
    assert kind(c.reverse(f"{tag}=={rest}", NOW)) in (SrsErrorKind.HASH_TOO_SHORT, SrsErrorKind.MALFORMED)


def test_forged_hash_and_altered_fields_are_refused() -> None:
    c = codec()
    address = c.forward("alice@sender.example", NOW)
    tag, digest, rest = address.split("=", 2)
    forged = "AAAA" if digest.upper() != "AAAA" else "BBBB"
    assert kind(c.reverse(f"{tag}={forged}={rest}", NOW)) is SrsErrorKind.BAD_HASH
    # somebody else's recipient under our valid-looking hash: refused (no open relay)
    assert kind(c.reverse(address.replace("=alice@", "=mallory@"), NOW)) is SrsErrorKind.BAD_HASH
    # another codec's secret does not verify
    assert kind(codec("other").reverse(address, NOW)) is SrsErrorKind.BAD_HASH


def test_longer_hash_is_checked_in_full() -> None:
    long_codec = codec(hash_length=8)
    address = long_codec.forward("alice@sender.example", NOW)
    assert reversed_ok(codec().reverse(address, NOW)) == "alice@sender.example"
    tag, digest, rest = address.split("=", 2)
    tampered = digest[:7] + ("x" if digest[7].lower() != "x" else "y")
    assert kind(codec().reverse(f"{tag}={tampered}={rest}", NOW)) is SrsErrorKind.BAD_HASH


def test_several_secrets_first_signs_all_verify() -> None:
    old = codec("old")
    rotated = codec("new", "old")
    from_old = old.forward("alice@sender.example", NOW)
    assert reversed_ok(rotated.reverse(from_old, NOW)) == "alice@sender.example"
    from_rotated = rotated.forward("alice@sender.example", NOW)
    assert from_rotated == codec("new").forward("alice@sender.example", NOW)
    assert kind(old.reverse(from_rotated, NOW)) is SrsErrorKind.BAD_HASH


@pytest.mark.parametrize(
    "address",
    ["SRS0=abcd@fwd.example", "SRS0=abcd=AB=domain@fwd.example", "SRS1=abcd=host@fwd.example", "SRS1=abcd=host=x@fwd.example"],
)
def test_malformed_srs_addresses_are_refused(address: str) -> None:
    assert kind(codec().reverse(address, NOW)) is SrsErrorKind.MALFORMED


def test_bad_timestamp_characters_are_refused() -> None:
    c = codec()
    tag, digest, _stamp, rest = c.forward("alice@sender.example", NOW).split("=", 3)
    result = c.reverse(f"{tag}={digest}=!1={rest}", NOW)
    assert kind(result) in (SrsErrorKind.BAD_HASH, SrsErrorKind.BAD_TIMESTAMP)


def test_ordinary_addresses_are_not_srs() -> None:
    assert kind(codec().reverse("alice@fwd.example", NOW)) is SrsErrorKind.NOT_SRS
    assert not is_srs("alice@fwd.example")
    assert not is_srs("SRS0@fwd.example")
    assert is_srs("srs0=abcd=AB=d=l@fwd.example")
    assert is_srs("SRS1+abcd=host==x@fwd.example")


def test_constructor_refuses_short_hashes_and_empty_secrets() -> None:
    with pytest.raises(ValueError):
        SrsCodec(["s"], OURS, hash_length=3)
    with pytest.raises(ValueError):
        SrsCodec([], OURS)
    with pytest.raises(ValueError):
        SrsCodec([""], OURS)


# -- secrets file -----------------------------------------------------------------------------


def test_load_secrets_one_per_line_first_signs(tmp_path: Path) -> None:
    path = tmp_path / "srs.secret"
    path.write_bytes(b"first secret\r\n\nsecond\n")
    assert load_secrets(path) == (b"first secret", b"second")


def test_load_secrets_errors_clearly_on_empty_or_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.secret"
    empty.write_bytes(b"\n  \n")
    with pytest.raises(SrsSecretError, match="holds no secret"):
        load_secrets(empty)
    with pytest.raises(SrsSecretError, match="cannot read"):
        load_secrets(tmp_path / "missing.secret")
