"""Routing: where mail for an address goes (first match wins), and what is refused."""

from pathlib import Path

import pytest

from maildetour.core import replies
from maildetour.core.address import Address, parse_address
from maildetour.core.routing import Accept, Refuse, RoutingTable, route
from tests.configs import SEED, seed_config

EXTRA = """
[mailbox."ituki+box@example.com"]
password = "x"

[mailbox."boss@example.com"]
password = "x"

[forward."@example.com"]
to = ["boss@example.com"]

[forward."team@example.com"]
to = ["ituki@example.com", "boss@example.com"]
"""


@pytest.fixture
def table(tmp_path: Path) -> RoutingTable:
    return seed_config(tmp_path, SEED + EXTRA).routing_table()


def go(table: RoutingTable, text: str) -> Accept | Refuse:
    parsed = parse_address(text)
    assert isinstance(parsed, Address)
    return route(table, parsed)


def test_the_public_address_fans_out_to_the_pc_mailbox_and_the_hidden_address(table: RoutingTable) -> None:
    found = go(table, "ituki@example.com")
    assert found == Accept("ituki@example.com", ("ituki@pc.example.net", "ituki-ex@gmail.com"),
                           "forward rule ituki@example.com")


def test_case_does_not_matter(table: RoutingTable) -> None:
    found = go(table, "ITUKI@Example.Com")
    assert isinstance(found, Accept) and found.recipient == "ituki@example.com"


def test_plus_addressing_uses_the_base_rule(table: RoutingTable) -> None:
    found = go(table, "ituki+shop@example.com")
    assert isinstance(found, Accept)
    assert found.targets == ("ituki@pc.example.net", "ituki-ex@gmail.com")
    assert "plus-address" in found.why


def test_an_exact_mailbox_wins_over_plus_addressing(table: RoutingTable) -> None:
    assert go(table, "ituki+box@example.com") == Accept(
        "ituki+box@example.com", ("ituki+box@example.com",), "mailbox ituki+box@example.com")


def test_mailbox_addresses_receive_directly(table: RoutingTable) -> None:
    found = go(table, "ituki@gm.example.net")
    assert isinstance(found, Accept) and found.targets == ("ituki@gm.example.net",)


def test_catch_all_takes_unknown_users_of_its_domain(table: RoutingTable) -> None:
    found = go(table, "anyone@example.com")
    assert isinstance(found, Accept) and found.targets == ("boss@example.com",)
    assert "catch-all" in found.why


def test_forwards_to_our_own_forwarded_addresses_are_expanded_without_duplicates(table: RoutingTable) -> None:
    found = go(table, "team@example.com")
    assert isinstance(found, Accept)
    assert found.targets == ("ituki@pc.example.net", "ituki-ex@gmail.com", "boss@example.com")


def test_unknown_user_without_catch_all_is_550_5_1_1(tmp_path: Path) -> None:
    table = seed_config(tmp_path).routing_table()
    found = go(table, "nobody@example.com")
    assert isinstance(found, Refuse) and found.reply == replies.UNKNOWN_USER
    assert str(found.reply).startswith("550 5.1.1")


@pytest.mark.parametrize("address", ["ituki-ex@gmail.com", "someone@example.org", "x@sub.example.com"])
def test_foreign_domains_are_refused_554_5_7_1_no_open_relay(table: RoutingTable, address: str) -> None:
    found = go(table, address)
    assert isinstance(found, Refuse) and str(found.reply).startswith("554 5.7.1")


def test_the_table_knows_kinds_hidden_destinations_and_detour_chains(table: RoutingTable) -> None:
    assert table.kind("ituki@pc.example.net") == "local"
    assert table.kind("ituki-ex@gmail.com") == "smtp"
    assert table.is_hidden("Ituki-Ex@Gmail.com")
    assert not table.is_hidden("ituki@gm.example.net")
    assert table.detour_chain("ituki-ex@gmail.com") == ("ituki-ex@gmail.com", "ituki@gm.example.net")
