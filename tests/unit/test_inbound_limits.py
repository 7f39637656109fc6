"""The pure parts of issue 10's receiving side: the per-client counters, the raw path check,
the reply to a store that cannot write, and the `[smtp]` keys that set the limits."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from maildetour.config.load import build_config
from maildetour.config.model import SmtpConfig
from maildetour.config.reader import ConfigError
from maildetour.core import replies
from maildetour.core.address import raw_path_problem
from maildetour.inbound.handler import storage_reply
from maildetour.core.client_key import client_key
from maildetour.inbound.limits import Buckets, Clients, default_limits, is_listed, sender_domain


def test_a_client_is_an_ipv4_address_or_an_ipv6_slash_64() -> None:
    """issue 10 #8: limits count per client; IPv6 hosts own a /64."""
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("not an address") == "not an address"


def test_unlimited_networks_match_mapped_and_plain_addresses() -> None:
    clients = Clients(SmtpConfig())
    assert clients.unlimited("127.0.0.1") and clients.unlimited("127.9.9.9") and clients.unlimited("::1")
    assert clients.unlimited("::ffff:127.0.0.1")
    assert not clients.unlimited("192.0.2.1") and not clients.unlimited("2001:db8::1")
    assert not is_listed("junk", clients.unlimited_networks)


def test_a_bucket_allows_a_burst_then_the_rate() -> None:
    """issue 10, rate control in: `amount` at once, then `amount` per period; 0 is no limit."""
    bucket = Buckets(3, 60.0, 100)
    assert [bucket.take("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take("b", 0.0)  # keys are separate
    assert not bucket.take("a", 19.0)  # 19 s regain 0.95 of a token
    assert bucket.take("a", 21.0) and not bucket.take("a", 21.0)
    assert all(Buckets(0, 60.0, 10).take("a", 0.0) for _ in range(1000))


def test_a_bucket_table_forgets_the_least_recently_seen_key() -> None:
    bucket = Buckets(1, 60.0, 2)
    assert bucket.take("a", 0.0) and bucket.take("b", 0.0)
    assert not bucket.take("a", 0.0)  # "a" is now the most recent
    assert bucket.take("c", 0.0)  # forgets "b"
    assert not bucket.take("a", 0.0) and bucket.take("b", 0.0)
    assert len(bucket._buckets) == 2


def test_sessions_per_client_and_connection_rate() -> None:
    """issue 10 #8: at most max_sessions_per_client at once; a session that ends frees its slot."""
    clients = Clients(SmtpConfig(max_sessions_per_client=2, client_connections_per_minute=3))
    assert clients.arrive("a", 0.0) is None and clients.arrive("a", 0.0) is None
    assert clients.arrive("a", 0.0) is replies.CLIENT_SESSIONS
    clients.leave("a")
    assert clients.arrive("a", 0.0) is None  # the third connection of the minute
    clients.leave("a")
    assert clients.arrive("a", 0.0) is replies.CLIENT_CONNECTION_RATE
    assert clients.arrive("b", 0.0) is None
    clients.leave("a")
    clients.leave("a")
    clients.leave("b")
    assert clients.sessions == {}


def test_refused_recipients_close_the_window_for_every_recipient() -> None:
    """issue 10 #4: past the window's refusals, RCPT gets 450 whatever the address."""
    clients = Clients(SmtpConfig(max_refused_per_client=2, refused_window=100.0))
    for _ in range(2):
        assert clients.rcpt("a", "sender.example", 0.0) is None
        clients.refused("a", 0.0)
    assert clients.rcpt("a", "sender.example", 1.0) is replies.CLIENT_REFUSED
    assert clients.rcpt("b", "sender.example", 1.0) is None
    assert clients.rcpt("a", "sender.example", 51.0) is None  # one refusal regained


def test_mail_and_rcpt_rates_per_client_and_per_sender_domain() -> None:
    clients = Clients(SmtpConfig(client_messages_per_minute=2, sender_domain_messages_per_minute=3,
                                 client_recipients_per_minute=0, sender_domain_recipients_per_minute=1))
    assert clients.mail("a", "d.example", 0.0) is None and clients.mail("a", "d.example", 0.0) is None
    assert clients.mail("a", "d.example", 0.0) is replies.CLIENT_MESSAGE_RATE
    assert clients.mail("b", "d.example", 0.0) is None
    assert clients.mail("c", "d.example", 0.0) is replies.DOMAIN_MESSAGE_RATE
    assert clients.rcpt("a", "d.example", 0.0) is None
    assert clients.rcpt("a", "d.example", 0.0) is replies.DOMAIN_RECIPIENT_RATE
    assert clients.rcpt("a", "", 0.0) is None  # the null sender has its own bucket


def test_sender_domain() -> None:
    assert sender_domain("Alice@Sender.Example") == "sender.example"
    assert sender_domain("<>") == "" and sender_domain("") == ""


@pytest.mark.parametrize(("argument", "problem"), [
    ("<(c)@relay.example:ituki@example.com>", "quoted"),
    ('<"ituki"@example.com>', "quoted"),
    ("<ituki(c)@example.com>", "quoted"),
    ("<ituki\\@x@example.com>", "quoted"),
    ("(c)<ituki@example.com>", "quoted"),
    ("(c) <ituki@example.com>", "quoted"),
    ("<@relay.example:ituki@example.com>", "source route"),
    ("<@a,@b:ituki@example.com>", "source route"),
    ("<relay.example:ituki@example.com>", "source route"),
    (" <@relay.example:ituki@example.com> SIZE=10", "source route"),
    ("<ituki@example.com>", None),
    ("<ituki@example.com> SIZE=100 BODY=8BITMIME", None),
    ("<>", None),
    ("ituki@example.com", None),
    ("<ituki@[IPv6:::1]>", None),  # an address literal: refused later by parse_address
    ("<ituki@example.com", None),  # aiosmtpd answers the syntax
])
def test_the_raw_path_check(argument: str, problem: str | None) -> None:
    """issue 10 #9: judged before aiosmtpd strips comments and quotes."""
    found = raw_path_problem(argument)
    assert (found is None) if problem is None else (found is not None and problem in found.reason)


def test_a_full_disk_is_452_4_3_1_and_other_storage_errors_451() -> None:
    """issue 10 (disk full): ENOSPC, EDQUOT and SQLITE_FULL mean "no room"; never a 250."""
    assert storage_reply(OSError(errno.ENOSPC, "No space left on device")) is replies.NO_STORAGE
    assert storage_reply(OSError(errno.EDQUOT, "Disk quota exceeded")) is replies.NO_STORAGE
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    assert storage_reply(full) is replies.NO_STORAGE
    assert storage_reply(OSError(errno.EIO, "I/O error")) is replies.INTERNAL_ERROR
    assert storage_reply(sqlite3.DatabaseError("malformed")) is replies.INTERNAL_ERROR
    assert str(replies.NO_STORAGE).startswith("452 4.3.1 ")


def test_a_real_sqlite_full_error_carries_code_13(tmp_path: Path) -> None:
    """The code `storage_reply` looks at is the one SQLite gives (max_page_count as a full disk)."""
    conn = sqlite3.connect(tmp_path / "tiny.db")
    conn.execute("PRAGMA max_page_count = 2")
    with pytest.raises(sqlite3.OperationalError) as caught:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    conn.close()
    assert storage_reply(caught.value) is replies.NO_STORAGE


def test_the_limit_keys_load_with_their_defaults_and_reasons(tmp_path: Path) -> None:
    """issue 10 #8 and rate control in: every limit is a key of [smtp] with a default."""
    default = build_config({}, tmp_path / "m.toml").smtp
    assert default == SmtpConfig(listen=default.listen)
    assert default.max_sessions_per_client == 50 < default.max_sessions
    assert default.unlimited_clients == ("127.0.0.0/8", "::1/128")
    small = build_config({"smtp": {"max_sessions": 4}}, tmp_path / "m.toml").smtp
    assert small.max_sessions_per_client == 2 == default_limits(4).max_sessions_per_client
    assert default_limits(1).max_sessions_per_client == 1
    loaded = build_config({"smtp": {
        "max_sessions_per_client": 7, "max_commands_without_progress": 9, "max_session_time": "10m",
        "max_refused_recipients": 5, "max_refused_per_client": 50, "refused_window": "30m",
        "client_connections_per_minute": 0, "client_messages_per_minute": 10,
        "client_recipients_per_minute": 20, "sender_domain_messages_per_minute": 30,
        "sender_domain_recipients_per_minute": 40, "unlimited_clients": ["192.0.2.0/24", "2001:db8::1"],
        "max_tracked_clients": 500}}, tmp_path / "m.toml").smtp
    assert (loaded.max_sessions_per_client, loaded.max_commands_without_progress, loaded.max_session_time,
            loaded.max_refused_recipients, loaded.max_refused_per_client, loaded.refused_window) == (
        7, 9, 600.0, 5, 50, 1800.0)
    assert (loaded.client_connections_per_minute, loaded.client_messages_per_minute,
            loaded.client_recipients_per_minute, loaded.sender_domain_messages_per_minute,
            loaded.sender_domain_recipients_per_minute, loaded.max_tracked_clients) == (0, 10, 20, 30, 40, 500)
    assert loaded.unlimited_clients == ("192.0.2.0/24", "2001:db8::1/128")


@pytest.mark.parametrize(("smtp", "key"), [
    ({"max_sessions": 4, "max_sessions_per_client": 5}, "smtp.max_sessions_per_client"),
    ({"client_messages_per_minute": -1}, "smtp.client_messages_per_minute"),
    ({"max_refused_recipients": 0}, "smtp.max_refused_recipients"),
    ({"max_session_time": 0}, "smtp.max_session_time"),
    ({"unlimited_clients": ["localhost"]}, "smtp.unlimited_clients[0]"),
])
def test_bad_limit_values_name_the_key(tmp_path: Path, smtp: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"smtp": smtp}, tmp_path / "m.toml")
    assert caught.value.key == key
