"""Inbound SPF/DKIM/DMARC verdicts (issue 4) against an in-memory zone; forged results stripped."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from maildetour.sign.dkim import DkimSigner, generate_key
from maildetour.verify.dnsfunc import DnsLookup, DnsTemporaryError
from maildetour.verify.verdicts import Verdicts, check

OURS = "mx.fwd.example"
SENDER_IP = "192.0.2.10"
MESSAGE = (
    b"From: Alice <alice@sender.example>\r\n"
    b"To: bob@fwd.example\r\n"
    b"Subject: lunch\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <lunch-1@sender.example>\r\n"
    b"\r\n"
    b"At noon?\r\n"
)


class ZoneResolver(dns.resolver.Resolver):
    """A resolver answering from a dict, with real dnspython Answer objects; records queries."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        super().__init__(configure=False)
        self.records = records
        self.asked: list[tuple[str, str]] = []

    def resolve(self, qname, rdtype=dns.rdatatype.A, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        name = dns.name.from_text(str(qname))
        kind = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))
        key = (name.to_text(omit_final_dot=True).lower(), kind)
        self.asked.append(key)
        if key not in self.records:
            if any(n == key[0] for n, _ in self.records):
                raise dns.resolver.NoAnswer()
            raise dns.resolver.NXDOMAIN()
        query = dns.message.make_query(name, kind)
        response = dns.message.make_response(query)
        texts = [_quoted(t) if kind == "TXT" else t for t in self.records[key]]
        rrset = dns.rrset.from_text_list(name, 300, "IN", kind, texts)
        response.find_rrset(response.answer, name, rrset.rdclass, rrset.rdtype, create=True).update(rrset)
        return dns.resolver.Answer(name, dns.rdatatype.from_text(kind), dns.rdataclass.IN, response)


def _quoted(text: str) -> str:
    return " ".join('"' + text[i : i + 250] + '"' for i in range(0, len(text), 250))


@pytest.fixture(scope="module")
def sender_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, str]]:
    folder = tmp_path_factory.mktemp("keys")
    keys = {}
    for name in ("good", "other"):
        txt = generate_key(folder / name, 1024)
        keys[name] = ((folder / name).read_bytes(), txt)
    return keys


def zone(sender_keys: dict[str, tuple[bytes, str]], *, spf: str = "v=spf1 ip4:192.0.2.0/24 -all",
         key: str | None = "good", dmarc: str | None = "v=DMARC1; p=reject") -> ZoneResolver:
    records: dict[tuple[str, str], list[str]] = {("sender.example", "TXT"): [spf]}
    if key is not None:
        records[("s1._domainkey.sender.example", "TXT")] = [sender_keys[key][1]]
    if dmarc is not None:
        records[("_dmarc.sender.example", "TXT")] = [dmarc]
    records[("relay.example", "TXT")] = ["v=spf1 ip4:198.51.100.7 ~all"]
    records[("helo.sender.example", "TXT")] = ["v=spf1 a -all"]
    records[("helo.sender.example", "A")] = [SENDER_IP]
    return ZoneResolver(records)


def signed(sender_keys: dict[str, tuple[bytes, str]], message: bytes = MESSAGE) -> bytes:
    return DkimSigner("sender.example", "s1", sender_keys["good"][0]).sign(message) + message


def run(data: bytes, resolver: dns.resolver.Resolver, *, ip: str = SENDER_IP,
        mail_from: str = "alice@sender.example", helo: str = "helo.sender.example",
        timeout: float = 5.0) -> Verdicts:
    return asyncio.run(check(data, client_ip=ip, helo=helo, mail_from=mail_from,
                             authserv_id=OURS, resolver=resolver, timeout=timeout))


# -- DKIM -------------------------------------------------------------------------------------


def test_good_signature_passes_and_dmarc_passes(sender_keys: dict[str, tuple[bytes, str]]) -> None:
    verdicts = run(signed(sender_keys), zone(sender_keys), ip="203.0.113.5")  # SPF fails: DKIM carries
    assert (verdicts.spf, verdicts.dkim, verdicts.dmarc) == ("fail", "pass", "pass")
    assert verdicts.dkim_domains == ("sender.example",)
    assert verdicts.authentication_results.startswith(OURS + "; spf=fail")
    assert "dkim=pass" in verdicts.authentication_results and "header.d=sender.example" in verdicts.authentication_results


def test_modified_body_fails_and_so_does_dmarc(sender_keys: dict[str, tuple[bytes, str]]) -> None:
    data = signed(sender_keys).replace(b"At noon?", b"At one?")
    verdicts = run(data, zone(sender_keys), ip="203.0.113.5")
    assert (verdicts.dkim, verdicts.dmarc, verdicts.dmarc_policy) == ("fail", "fail", "reject")
    assert verdicts.dkim_domains == ()


def test_wrong_key_fails(sender_keys: dict[str, tuple[bytes, str]]) -> None:
    assert run(signed(sender_keys), zone(sender_keys, key="other")).dkim == "fail"


def test_missing_key_is_a_permanent_error(sender_keys: dict[str, tuple[bytes, str]]) -> None:
    verdicts = run(signed(sender_keys), zone(sender_keys, key=None))
    assert verdicts.dkim == "permerror"
    assert "no key for signature" in verdicts.authentication_results


def test_unsigned_message_has_dkim_none(sender_keys: dict[str, tuple[bytes, str]]) -> None:
    verdicts = run(MESSAGE, zone(sender_keys))
    assert verdicts.dkim == "none"
    assert (verdicts.spf, verdicts.dmarc) == ("pass", "pass")  # aligned SPF alone passes DMARC


def test_one_good_signature_among_bad_ones_passes(sender_keys: dict[str, tuple[bytes, str]]) -> None:
    bad = DkimSigner("sender.example", "s1", sender_keys["other"][0]).sign(MESSAGE)
    verdicts = run(bad + signed(sender_keys), zone(sender_keys), ip="203.0.113.5")
    assert verdicts.dkim == "pass"
    assert verdicts.authentication_results.count("dkim=") == 2
    assert verdicts.dmarc == "pass"


# -- SPF --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mail_from", "ip", "expected"),
    [
        ("alice@sender.example", SENDER_IP, "pass"),
        ("alice@sender.example", "203.0.113.5", "fail"),
        ("someone@relay.example", "203.0.113.5", "softfail"),
        ("someone@nospf.example", SENDER_IP, "none"),
    ],
)
def test_spf_results(sender_keys: dict[str, tuple[bytes, str]], mail_from: str, ip: str, expected: str) -> None:
    verdicts = run(MESSAGE, zone(sender_keys), ip=ip, mail_from=mail_from)
    assert verdicts.spf == expected
    assert f"spf={expected} " in verdicts.authentication_results


def test_null_sender_is_checked_with_the_helo_identity(sender_keys: dict[str, tuple[bytes, str]]) -> None:
    resolver = zone(sender_keys)
    assert run(MESSAGE, resolver, mail_from="").spf == "pass"
    assert ("helo.sender.example", "TXT") in resolver.asked
    assert run(MESSAGE, zone(sender_keys), mail_from="", ip="203.0.113.5").spf == "fail"


def test_all_lookups_go_through_the_given_resolver(sender_keys: dict[str, tuple[bytes, str]]) -> None:
    resolver = zone(sender_keys)
    run(signed(sender_keys), resolver)
    asked = {name for name, _ in resolver.asked}
    assert {"sender.example", "s1._domainkey.sender.example", "_dmarc.sender.example"} <= asked


def test_dmarc_none_without_a_record(sender_keys: dict[str, tuple[bytes, str]]) -> None:
    verdicts = run(MESSAGE, zone(sender_keys, dmarc=None), ip="203.0.113.5")
    assert verdicts.dmarc == "none"


# -- DNS that does not answer -----------------------------------------------------------------


@pytest.fixture
def silent_dns() -> Iterator[dns.resolver.Resolver]:
    """A resolver pointed at a loopback UDP port that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = sink.getsockname()[1]
        yield resolver


def test_dns_timeout_gives_temperror_not_a_stall(sender_keys: dict[str, tuple[bytes, str]],
                                                 silent_dns: dns.resolver.Resolver) -> None:
    verdicts = run(signed(sender_keys), silent_dns, timeout=0.3)
    assert (verdicts.spf, verdicts.dkim, verdicts.dmarc) == ("temperror", "temperror", "temperror")


def test_field_is_folded_and_unfolds_to_the_value(sender_keys: dict[str, tuple[bytes, str]]) -> None:
    verdicts = run(signed(sender_keys), zone(sender_keys))
    field = verdicts.field()
    assert field.startswith(b"Authentication-Results: " + OURS.encode() + b";\r\n ")
    assert field.endswith(b"\r\n")
    unfolded = field[len(b"Authentication-Results: "):-2].replace(b"\r\n", b"").decode()
    assert unfolded == verdicts.authentication_results


# -- the DNS adapter given to dkimpy (ARC sealing) ------------------------------------------------


def test_dns_adapter_returns_joined_txt_as_bytes() -> None:
    long_text = "v=DKIM1; k=rsa; p=" + "A" * 400  # served as two character-strings
    resolver = ZoneResolver({("s._domainkey.d.example", "TXT"): [long_text]})
    lookup = DnsLookup(resolver, timeout=5.0)
    assert lookup(b"s._domainkey.d.example.", timeout=5) == long_text.encode()
    assert lookup(b"missing.d.example.") is None


def test_dns_adapter_prefers_the_tagged_record_among_several() -> None:
    resolver = ZoneResolver({("_dmarc.d.example", "TXT"): ["site-verification=xyz", "v=DMARC1; p=none"]})
    assert DnsLookup(resolver, timeout=5.0)(b"_dmarc.d.example") == b"v=DMARC1; p=none"


def test_dns_adapter_turns_timeouts_and_a_spent_budget_into_temporary_errors(
    silent_dns: dns.resolver.Resolver,
) -> None:
    with pytest.raises(DnsTemporaryError):
        DnsLookup(silent_dns, timeout=0.2)(b"x.example.")
    spent = DnsLookup(ZoneResolver({}), timeout=5.0, deadline=time.monotonic() - 1)
    with pytest.raises(DnsTemporaryError):
        spent.records("x.example", "TXT")
