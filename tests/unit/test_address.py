"""Addresses: what RCPT/MAIL arguments we take, and the relay tricks we refuse."""

import pytest

from maildetour.core.address import Address, AddressError, base_address, parse_address


def test_plain_address_is_parsed_and_domain_lowercased() -> None:
    parsed = parse_address("Ituki@Example.COM")
    assert parsed == Address("Ituki", "example.com")
    assert isinstance(parsed, Address) and parsed.key == "ituki@example.com"


@pytest.mark.parametrize(
    "text",
    [
        "user%gmail.com@example.com",  # %-hack
        "gmail.com!user@example.com",  # bang path
        "@relay.example:user@gmail.com",  # source route
        '"user@gmail.com"@example.com',  # quoted local part hiding an @
        "user@[127.0.0.1]",  # IP literal
        "user@example.com.",  # trailing dot
        "user@@example.com",
        "user",
        "",
        ".user@example.com",
        "us..er@example.com",
        "user@-bad-.example",
        "user@127.0.0.1",
        "a" * 65 + "@example.com",
    ],
)
def test_relay_tricks_and_malformed_addresses_are_refused(text: str) -> None:
    assert isinstance(parse_address(text), AddressError)


def test_plus_addressing_strips_the_tag() -> None:
    assert base_address(Address("user+news", "example.com")) == Address("user", "example.com")
    assert base_address(Address("user", "example.com")) == Address("user", "example.com")
    assert base_address(Address("+tag", "example.com")) == Address("+tag", "example.com")


def test_utf8_local_part_is_accepted_for_smtputf8() -> None:
    assert parse_address("josé@example.com") == Address("josé", "example.com")
