"""core.mta_sts and the policy choice of delivery.tls_policy: RFC 8461 text in, values out."""

import asyncio

from maildetour.core.mta_sts import StsError, StsPolicy, mx_matches, parse_policy, txt_id
from maildetour.delivery.tls_policy import TlsPolicies, TlsPolicy

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx.dest.test\r\nmx: *.mail.dest.test\r\nmax_age: 86400\r\n"


def test_the_txt_record_gives_the_policy_id() -> None:
    assert txt_id(["v=STSv1; id=20260101T000000;"]) == "20260101T000000"
    assert txt_id(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert isinstance(txt_id([]), StsError)
    assert isinstance(txt_id(["v=STSv1; id=a b"]), StsError)
    assert isinstance(txt_id(["v=STSv1; id=1", "v=STSv1; id=2"]), StsError)  # ambiguous: none


def test_a_policy_file_is_read_strictly() -> None:
    assert parse_policy(POLICY) == StsPolicy("enforce", ("mx.dest.test", "*.mail.dest.test"), 86400)
    assert parse_policy(POLICY.replace("\r\n", "\n")) == parse_policy(POLICY)
    assert parse_policy(POLICY.replace("86400", "99999999999")) == StsError("policy max_age is not a number")
    capped = parse_policy(POLICY.replace("86400", "999999999"))
    assert isinstance(capped, StsPolicy) and capped.max_age == 31_557_600
    for broken in (POLICY.replace("STSv1", "STSv2"), POLICY.replace("enforce", "strict"),
                   "version: STSv1\nmode: enforce\nmax_age: 1\n", POLICY.replace("mx.dest.test", "mx..dest")):
        assert isinstance(parse_policy(broken), StsError), broken
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 1\n") == StsPolicy("none", (), 1)


def test_mx_patterns_match_one_label_at_most() -> None:
    patterns = ("mx.dest.test", "*.mail.dest.test")
    assert mx_matches(patterns, "MX.dest.test.") and mx_matches(patterns, "a.mail.dest.test")
    assert not mx_matches(patterns, "a.b.mail.dest.test") and not mx_matches(patterns, "mail.dest.test")
    assert not mx_matches(patterns, "evil-mx.dest.test")


class FakeSts:
    def __init__(self, policy: StsPolicy | None) -> None:
        self.found, self.asked = policy, 0

    async def policy(self, domain: str) -> StsPolicy | None:
        self.asked += 1
        return self.found


def choose(sts: StsPolicy | None, *, relay: bool = False, address: str = "a@dest.test") -> TlsPolicy:
    policies = TlsPolicies(default="opportunistic", per_domain={"strict.test": "verify"},
                           per_address={"hidden@dest.test": "required"}, sts=FakeSts(sts))  # type: ignore[arg-type]
    return asyncio.run(policies.policy(address.rpartition("@")[2], address, relay=relay))


def test_the_config_decides_unless_the_domain_enforces_mta_sts() -> None:
    assert choose(None) == TlsPolicy("opportunistic")
    assert choose(None, address="b@strict.test") == TlsPolicy("verify", source="tls_policy")
    assert choose(None, address="hidden@dest.test") == TlsPolicy("required", source="destination")
    enforce = StsPolicy("enforce", ("mx.dest.test",), 86400)
    assert choose(enforce) == TlsPolicy("verify", ("mx.dest.test",), "MTA-STS")
    assert choose(enforce, address="hidden@dest.test").mode == "verify"  # only ever stronger
    assert choose(StsPolicy("testing", ("mx.dest.test",), 86400)) == TlsPolicy("opportunistic")
    assert choose(enforce, relay=True) == TlsPolicy("opportunistic")  # a relay is not the MX


def test_an_address_with_its_own_policy_never_shares_a_job() -> None:
    policies = TlsPolicies(default="opportunistic", per_domain={}, per_address={"h@d.test": "verify", "x@d.test": None},
                           sts=None)
    assert policies.key("H@d.test") == "tls=verify" and policies.key("x@d.test") == "" and policies.key("o@d.test") == ""
