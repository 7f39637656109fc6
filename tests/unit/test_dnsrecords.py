"""The records a setup needs and the checks of what DNS answered (maildetour.dnsrecords). Issue 12.

Pure: facts and answers are plain values here; `tests/integration/test_dns_doctor.py` runs the
same against a real dnsmasq.
"""

from __future__ import annotations

from maildetour.dnsrecords import (
    Answer,
    DkimKey,
    Facts,
    check_dkim,
    check_dmarc,
    check_forward,
    check_mx,
    check_ptr,
    check_spf,
    expected,
    txt_data,
    zone_text,
)
from maildetour.sign.dkim_keys import PublicKey

KEY = PublicKey("ed25519", bytes(range(32)))
FACTS = Facts("mx.example.com", ("example.com", "pc.example.net"), "example.com",
              (DkimKey("md1e", "example.com", KEY),))


def by_name(facts: Facts) -> dict[tuple[str, str], str]:
    return {(r.name, r.rtype): r.value for r in expected(facts)}


def test_records_without_an_address_use_mx_and_a_in_spf() -> None:
    records = by_name(FACTS)
    assert records[("example.com", "MX")] == "10 mx.example.com."
    assert records[("pc.example.net", "MX")] == "10 mx.example.com."
    assert records[("example.com", "TXT")] == "v=spf1 mx -all"
    assert records[("mx.example.com", "TXT")] == "v=spf1 a -all"  # the HELO name
    assert records[("md1e._domainkey.example.com", "TXT")] == KEY.record
    assert records[("_dmarc.pc.example.net", "TXT")] == "v=DMARC1; p=none"
    assert not any(rtype in ("A", "AAAA", "PTR") for _, rtype in records)


def test_records_with_addresses_name_them_and_ask_for_the_ptr() -> None:
    records = by_name(Facts(FACTS.hostname, FACTS.domains, FACTS.srs_domain, (), ("192.0.2.10", "2001:db8::25")))
    assert records[("mx.example.com", "A")] == "192.0.2.10"
    assert records[("mx.example.com", "AAAA")] == "2001:db8::25"
    assert records[("10.2.0.192.in-addr.arpa", "PTR")] == "mx.example.com."
    assert records[("example.com", "TXT")] == "v=spf1 ip4:192.0.2.10 ip6:2001:db8::25 -all"


def test_zone_text_explains_each_record_and_splits_long_txt() -> None:
    text = zone_text(expected(FACTS), ["give --ip for the PTR"])
    assert text.startswith("; give --ip for the PTR\n")
    assert "; SPF of the SRS domain: the envelope sender of every forwarded copy\nexample.com.\tIN TXT\t" in text
    long = "v=DKIM1; k=rsa; p=" + "A" * 400
    assert txt_data(long) == f'( "{long[:250]}" "{long[250:]}" )'
    assert txt_data("v=spf1 -all") == '"v=spf1 -all"'


def test_mx_must_name_our_host() -> None:
    both = Answer(("10 mx.example.com", "20 backup.example.net"))
    assert check_mx("example.com", "mx.example.com", both).status == "ok"
    assert check_mx("example.com", "mx.example.com", Answer(("10 MX.Example.com.",))).status == "ok"
    missing = check_mx("example.com", "mx.example.com", Answer())
    assert (missing.status, missing.detail) == ("missing", "publish 10 mx.example.com.")
    wrong = check_mx("example.com", "mx.example.com", Answer(("10 mail.provider.example",)))
    assert wrong.line == "wrong   MX example.com: names mail.provider.example, not mx.example.com"
    assert "null MX" in check_mx("example.com", "mx.example.com", Answer(("0 .",))).detail
    assert check_mx("example.com", "mx.example.com", Answer(error="timeout")).status == "error"


def test_spf_of_the_srs_domain_must_pass_for_every_server_address() -> None:
    record = Answer(("v=spf1 mx -all", "google-site-verification=xyz"))
    assert check_spf("example.com", "SRS domain", record, {"192.0.2.10": "pass"}, True).line == \
        "ok      SPF example.com (SRS domain): pass for 192.0.2.10"
    failing = check_spf("example.com", "SRS domain", record, {"192.0.2.10": "pass", "2001:db8::25": "softfail"}, True)
    assert failing.status == "wrong" and "softfail for 2001:db8::25" in failing.detail
    assert check_spf("example.com", "", Answer(), {}, False).status == "missing"
    assert check_spf("example.com", "", Answer(("v=spf1 -all", "v=spf1 mx -all")), {}, False).status == "wrong"
    assert check_spf("example.com", "", Answer(("v=spf1x",)), {}, False).status == "missing"  # not an SPF record
    assert "not evaluated" in check_spf("example.com", "SRS domain", record, {}, True).detail


def test_dkim_record_must_hold_our_key() -> None:
    ours = DkimKey("md1e", "example.com", KEY)
    assert check_dkim(ours, Answer((KEY.record,))).status == "ok"
    assert check_dkim(ours, Answer(("v=DKIM1; k=ed25519; p=" + "B" * 43 + "=",))).status == "wrong"
    assert check_dkim(ours, Answer(("v=DKIM1; k=ed25519; p=",))).status == "wrong"  # revoked
    assert check_dkim(ours, Answer()).status == "missing"
    unreadable = DkimKey("md1", "example.com", None, "cannot read our key (dkim.key: No such file or directory)")
    assert check_dkim(unreadable, Answer((KEY.record,))).line.startswith(
        "error   DKIM md1._domainkey.example.com: cannot read our key")


def test_dmarc_is_one_record() -> None:
    assert check_dmarc("example.com", Answer(("v=DMARC1; p=reject; rua=mailto:d@example.com",))).status == "ok"
    assert check_dmarc("example.com", Answer(("v=DMARC1;p=none",))).status == "ok"
    assert check_dmarc("example.com", Answer(("some other text",))).status == "missing"
    assert check_dmarc("example.com", Answer(("v=DMARC1; p=none", "v=DMARC1; p=reject"))).status == "wrong"


def test_ptr_and_forward_dns_must_agree_with_our_helo() -> None:
    assert check_ptr("192.0.2.10", "mx.example.com", Answer(("mx.example.com",))).status == "ok"
    wrong = check_ptr("192.0.2.10", "mx.example.com", Answer(("vps-10.hoster.example",)))
    assert wrong.line == "wrong   PTR 192.0.2.10: names vps-10.hoster.example, not mx.example.com (our HELO)"
    assert check_ptr("192.0.2.10", "mx.example.com", Answer()).status == "missing"
    assert check_forward("mx.example.com", ("192.0.2.10",), [Answer(("192.0.2.10",)), Answer()]).status == "ok"
    assert check_forward("mx.example.com", ("2001:db8:0::25",), [Answer(), Answer(("2001:db8::25",))]).status == "ok"
    assert check_forward("mx.example.com", ("192.0.2.11",), [Answer(("192.0.2.10",)), Answer()]).status == "wrong"
    assert check_forward("mx.example.com", (), [Answer(), Answer()]).status == "missing"
