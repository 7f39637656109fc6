"""Our DMARC code (RFC 7489) and the domain names it compares, without DNS (issue 10 #12).

authheaders 0.16.3 cut domains at the first '-': the organizational domain and the policy
lookup were wrong for every hyphenated domain. The DNS side is tested against dnsmasq in
tests/integration/test_verdicts_dns.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maildetour.verify.dkim_check import DkimVerdict
from maildetour.verify.dmarc import (
    MAX_AUTHORS, Author, DmarcVerdict, NoPolicy, Policy, PolicyError, Record, combine, evaluate,
    parse_record, read_authors)
from maildetour.verify.lookups import NeedLookup, View
from maildetour.verify.names import ascii_name, organizational_domain
from maildetour.verify.spf_check import SpfVerdict


@pytest.mark.parametrize(("name", "expected"), [
    ("spf-pass.test", "spf-pass.test"),
    ("Mail.SPF-Pass.Test.", "mail.spf-pass.test"),
    (b"s1._domainkey.spf-pass.test.", "s1._domainkey.spf-pass.test"),
    ("bücher.test", "xn--bcher-kva.test"),
    ("BÜCHER.test", "xn--bcher-kva.test"),
    ("xn--bcher-kva.test", "xn--bcher-kva.test"),
    ("_dmarc.bücher.test", "_dmarc.xn--bcher-kva.test"),
    ("", None),
    ("a..b", None),
    ("a" * 64 + ".test", None),
    ("ex ample.test", None),
    (b"\xff.test", None),
])
def test_names_are_put_in_ascii_form(name: str | bytes, expected: str | None) -> None:
    """Issue 10 #12: U-labels and A-labels are one name; hyphens are kept."""
    assert ascii_name(name) == expected


@pytest.mark.parametrize(("domain", "org"), [
    ("spf-pass.test", "spf-pass.test"),  # not "spf": the bug of authheaders 0.16.3
    ("a.b.spf-pass.test", "spf-pass.test"),
    ("mail.example.co.uk", "example.co.uk"),
    ("example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),
    ("x.y.xn--fiqs8s", "y.xn--fiqs8s"),  # 中国, a public suffix in U-labels on the list
    ("mail.xn--bcher-kva.test", "xn--bcher-kva.test"),
])
def test_organizational_domain_follows_the_public_suffix_list(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


def test_records_parse_with_defaults_and_fall_backs() -> None:
    assert parse_record("v=DMARC1; p=reject") == Record("reject", None, "r", "r")
    assert parse_record("v=DMARC1;p=Quarantine;sp=none;adkim=s;aspf=S;pct=50") == Record("quarantine", "none", "s", "s")
    assert parse_record("v=DMARC1; p=bogus; rua=mailto:d@x.test") == Record("none", None, "r", "r")
    assert parse_record("v=DMARC1; p=bogus") is None
    assert parse_record("v=DMARC1; sp=reject") is None
    assert parse_record("v=DMARC1; p=reject; sp=weird; adkim=x") == Record("reject", None, "r", "r")
    assert parse_record("v=DMARC1; p reject") is None


def spf(result: str, domain: str) -> SpfVerdict:
    return SpfVerdict(result, f"x@{domain}", domain, organizational_domain(domain))


def dkim(result: str, domain: str) -> DkimVerdict:
    return DkimVerdict(result, None, domain, None, "s1", None, domain, organizational_domain(domain))


AUTHOR = Author("spf-pass.test", "spf-pass.test")
REJECT = Policy(Record("reject", None, "r", "r"), subdomain=False)
STRICT = Policy(Record("reject", None, "s", "s"), subdomain=False)


def test_aligned_spf_or_dkim_passes_relaxed_and_strict() -> None:
    assert evaluate(AUTHOR, REJECT, spf("pass", "spf-pass.test"), []).result == "pass"
    assert evaluate(AUTHOR, REJECT, spf("pass", "bounces.spf-pass.test"), []).result == "pass"
    assert evaluate(AUTHOR, STRICT, spf("pass", "bounces.spf-pass.test"), []).result == "fail"
    assert evaluate(AUTHOR, REJECT, spf("fail", "x.test"), [dkim("pass", "mail.spf-pass.test")]).result == "pass"
    assert evaluate(AUTHOR, STRICT, spf("fail", "x.test"), [dkim("pass", "mail.spf-pass.test")]).result == "fail"
    verdict = evaluate(AUTHOR, REJECT, spf("pass", "spf.test"), [dkim("pass", "pass.test")])
    assert (verdict.result, verdict.policy, verdict.comment) == ("fail", "reject", "p=reject")


def test_subdomain_policy_applies_to_a_subdomain_author() -> None:
    sub = Author("mail.spf-pass.test", "spf-pass.test")
    found = Policy(Record("reject", "quarantine", "r", "r"), subdomain=True)
    verdict = evaluate(sub, found, spf("fail", "x.test"), [])
    assert (verdict.result, verdict.policy, verdict.comment) == ("fail", "quarantine", "p=reject sp=quarantine")


def test_slow_dns_of_an_aligned_identifier_is_temperror_but_a_forger_gets_fail() -> None:
    """A slow DNS must not look like forgery, but a forger cannot dodge `fail` by pointing
    MAIL FROM or d= at a domain of his own whose DNS never answers."""
    assert evaluate(AUTHOR, REJECT, spf("temperror", "spf-pass.test"), []).result == "temperror"
    assert evaluate(AUTHOR, REJECT, spf("fail", "x.test"), [dkim("temperror", "spf-pass.test")]).result == "temperror"
    assert evaluate(AUTHOR, REJECT, spf("temperror", "forger.test"), []).result == "fail"
    assert evaluate(AUTHOR, REJECT, spf("fail", "x.test"), [dkim("temperror", "forger.test")]).result == "fail"


def test_no_policy_and_policy_errors() -> None:
    assert evaluate(AUTHOR, NoPolicy(), spf("fail", "x.test"), []) == DmarcVerdict("none", "spf-pass.test")
    verdict = evaluate(AUTHOR, PolicyError("temperror", "DNS timeout"), spf("pass", "spf-pass.test"), [])
    assert (verdict.result, verdict.reason) == ("temperror", "DNS timeout")


def test_several_from_domains_give_the_worst_verdict() -> None:
    verdicts = [DmarcVerdict("pass", "a.test"), DmarcVerdict("fail", "victim.test"), DmarcVerdict("none", "b.test")]
    assert combine(verdicts).from_domain == "victim.test"
    assert combine([DmarcVerdict("none", "a.test"), DmarcVerdict("pass", "b.test")]).result == "none"


def test_from_domains_are_read_in_ascii_form_and_bounded() -> None:
    data = ('From: "x@trusted.test" <alice@Bücher.TEST>, bob@spf-pass.test\r\nFrom: carol@spf-pass.test\r\n'
            "Subject: x\r\n\r\nbody\r\n").encode()
    assert read_authors(data) == [Author("xn--bcher-kva.test", "xn--bcher-kva.test"),
                                  Author("spf-pass.test", "spf-pass.test")]
    assert read_authors(b"Subject: no from\r\n\r\nbody\r\n") == DmarcVerdict("permerror", "", reason="no From domain")
    assert read_authors(b"From: a@[192.0.2.1]\r\n\r\n") == [Author("", "")]
    many = ", ".join(f"a@d{i}.test" for i in range(MAX_AUTHORS + 1))
    verdict = read_authors(f"From: {many}\r\n\r\n".encode())
    assert isinstance(verdict, DmarcVerdict) and verdict.result == "fail"


def test_a_view_notes_names_not_fetched_yet() -> None:
    view = View({})
    with pytest.raises(NeedLookup):
        view.get("S1._domainkey.Bücher.test.", "txt")
    with pytest.raises(NeedLookup):
        view.get("s1._domainkey.xn--bcher-kva.test", "TXT")
    assert view.missing == [("s1._domainkey.xn--bcher-kva.test", "TXT")]
    assert view.get("not a name", "TXT").records == ()  # no DNS name: no data, no query


# -- any input: an answer, never an exception -------------------------------------------------
LABELS = st.sampled_from(["spf-pass", "bücher", "xn--bcher-kva", "_dmarc", "co", "uk", "test", "",
                          "a" * 64, "ex ample", "-x", "ß", "中国", "\x00"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(LABELS, max_size=6).map(".".join), st.text(max_size=80), st.binary(max_size=80)))
def test_names_never_raise_and_are_dns_ready(name: str | bytes) -> None:
    text = ascii_name(name)
    if text is not None:
        assert text.isascii() and text == text.lower() and len(text) <= 253
        assert organizational_domain(text).endswith(text.rsplit(".", 1)[-1])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_records_never_raise(text: str) -> None:
    record = parse_record(text)
    assert record is None or record.p in ("none", "quarantine", "reject")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.text(max_size=120))
def test_from_fields_never_raise(junk: bytes, value: str) -> None:
    for data in (junk, b"From: " + value.encode("utf-8", "surrogatepass") + b"\r\n\r\nbody", b"From:" + junk):
        found = read_authors(data)
        assert isinstance(found, (list, DmarcVerdict))
