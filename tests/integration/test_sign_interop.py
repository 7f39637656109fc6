"""SRS, DKIM, ARC and inbound verdicts checked by independent peers (issue 4).

- postsrsd (Debian 1.10, tcp_table on loopback) reverses our SRS addresses and we reverse its own;
- opendkim-testmsg (libopendkim) verifies our DKIM signature, fetching the key from dnsmasq;
- dkimpy verifies signatures and a two-instance ARC chain through dnsmasq and our DNS adapter;
- inbound verdicts (SPF/DKIM/DMARC) are computed against zones served by dnsmasq;
- pyspf gives `pass` for an SRS envelope sent from our IP under our zone's SPF record.

opendkim-testmsg has no option naming a DNS server or a key file; libopendkim reads
/etc/resolv.conf (port 53 only). The test runs it in a private mount namespace (`unshare -m`)
where a resolv.conf naming a loopback dnsmasq on port 53 is bind-mounted over /etc/resolv.conf:
the machine's own file is never changed. That needs root; without it the test is skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import dkim
import pytest

from maildetour.sign.arc import seal
from maildetour.sign.dkim import DkimSigner, generate_key
from maildetour.verify.dnsfunc import DnsLookup
from maildetour.sign.srs import SrsCodec, SrsError, load_secrets
from maildetour.verify.verdicts import Verdicts, check
from tests.peers.dnsmasq import DnsPeer, DnsRecords, running_dnsmasq
from tests.peers.opendkim import Port53Dns, running_port53_dnsmasq, verify_with_opendkim
from tests.peers.postsrsd import PostSrsd, running_postsrsd

OURS = "fwd.test"
OUR_IP = "198.51.100.25"
SENDER_IP = "192.0.2.10"
AUTHSERV = "mx.fwd.test"
MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@fwd.test\r\n"
    b"Subject: lunch\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <lunch-1@sender.test>\r\n"
    b"\r\n"
    b"At noon?\r\n"
)


# -- postsrsd ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postsrsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostSrsd]:
    workdir = tmp_path_factory.mktemp("postsrsd")
    secret_file = workdir / "srs.secret"
    secret_file.write_bytes(b"current-secret-0c9f\nretired-secret-77aa\n")
    with running_postsrsd(workdir, OURS, secret_file) as peer:
        yield peer


@pytest.fixture(scope="module")
def codec(postsrsd: PostSrsd) -> SrsCodec:
    return SrsCodec(load_secrets(postsrsd.secret_file), OURS)


def test_postsrsd_reverses_our_srs0_to_the_original_sender(postsrsd: PostSrsd, codec: SrsCodec) -> None:
    ours = codec.forward("Alice.Smith@Sender.test", time.time())
    assert postsrsd.reverse(ours) == (200, "Alice.Smith@Sender.test")
    assert postsrsd.reverse(ours.lower())[0] == 200  # both decode case-insensitively


def test_we_reverse_postsrsd_srs0(postsrsd: PostSrsd, codec: SrsCodec) -> None:
    theirs = postsrsd.forward("alice@sender.test")
    assert theirs.startswith("SRS0=") and theirs.endswith("@" + OURS)
    assert codec.reverse(theirs, time.time()) == "alice@sender.test"
    assert codec.reverse(theirs.lower(), time.time()) == "alice@sender.test"
    assert theirs == codec.forward("alice@sender.test", time.time())  # same bytes, same day


def test_srs1_both_ways(postsrsd: PostSrsd, codec: SrsCodec) -> None:
    first_hop = SrsCodec([b"elsewhere"], "first.test").forward("alice@sender.test", time.time())
    ours = codec.forward(first_hop, time.time())
    assert ours.startswith("SRS1=")
    assert postsrsd.reverse(ours) == (200, first_hop)
    theirs = postsrsd.forward(first_hop)
    assert theirs.startswith("SRS1=")
    assert codec.reverse(theirs, time.time()) == first_hop


def test_a_retired_secret_still_verifies_on_both_sides(postsrsd: PostSrsd) -> None:
    retired = SrsCodec([b"retired-secret-77aa"], OURS).forward("alice@sender.test", time.time())
    assert postsrsd.reverse(retired) == (200, "alice@sender.test")


def test_forged_hash_is_refused_by_both(postsrsd: PostSrsd, codec: SrsCodec) -> None:
    tag, digest, rest = codec.forward("alice@sender.test", time.time()).split("=", 2)
    forged = f"{tag}={'AAAA' if digest != 'AAAA' else 'BBBB'}={rest}"
    assert postsrsd.reverse(forged)[0] == 500
    assert isinstance(codec.reverse(forged, time.time()), SrsError)


# -- DNS zones --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keys:
    ours: tuple[bytes, str]  # PEM, TXT
    sender: tuple[bytes, str]
    other: tuple[bytes, str]
    hop2: tuple[bytes, str]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    made = []
    for name in ("ours", "sender", "other", "hop2"):
        txt = generate_key(folder / name)  # 2048 bits: the TXT record spans several strings
        made.append(((folder / name).read_bytes(), txt))
    return Keys(*made)


def records(keys: Keys) -> DnsRecords:
    return DnsRecords(
        zones=(OURS, "hop2.test", "sender.test", "soft.test", "nospf.test"),
        txt=(
            (OURS, f"v=spf1 ip4:{OUR_IP} -all"),
            (f"md1._domainkey.{OURS}", keys.ours[1]),
            ("md1._domainkey.hop2.test", keys.hop2[1]),
            ("sender.test", "v=spf1 ip4:192.0.2.0/24 -all"),
            ("s1._domainkey.sender.test", keys.sender[1]),
            ("s2._domainkey.sender.test", keys.other[1]),  # s2 signs with "sender", publishes "other"
            ("_dmarc.sender.test", "v=DMARC1; p=reject"),
            ("soft.test", "v=spf1 ip4:203.0.113.0/24 ~all"),
        ),
        a=(("nospf.test", "203.0.113.9"),),
    )


@pytest.fixture(scope="module")
def dns_peer(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[DnsPeer]:
    with running_dnsmasq(tmp_path_factory.mktemp("dnsmasq"), records(keys)) as peer:
        yield peer


def lookup(peer: DnsPeer) -> DnsLookup:
    return DnsLookup(peer.sync_resolver(), timeout=5.0)


# -- DKIM and ARC verified by others ----------------------------------------------------------


def test_dkimpy_verifies_our_signature_through_dnsmasq(dns_peer: DnsPeer, keys: Keys) -> None:
    signed = DkimSigner(OURS, "md1", keys.ours[0]).sign(MESSAGE) + MESSAGE
    assert dkim.verify(signed, dnsfunc=lookup(dns_peer))
    assert not dkim.verify(signed.replace(b"noon", b"one"), dnsfunc=lookup(dns_peer))


@pytest.fixture(scope="module")
def port53_dns(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Port53Dns]:
    """dnsmasq on a random 127.53.x.y, port 53 (libopendkim's resolver cannot use another port)."""
    with running_port53_dnsmasq(tmp_path_factory.mktemp("dnsmasq53"), records(keys)) as peer:
        yield peer


def test_opendkim_testmsg_verifies_our_signature(port53_dns: Port53Dns, keys: Keys) -> None:
    resolv_conf = port53_dns.resolv_conf
    original = DkimSigner("sender.test", "s1", keys.sender[0]).sign(MESSAGE) + MESSAGE
    signed = DkimSigner(OURS, "md1", keys.ours[0]).sign(original) + original
    good = verify_with_opendkim(resolv_conf, signed)
    assert good.returncode == 0, good.stderr
    assert f"md1._domainkey.{OURS}" in port53_dns.peer.log()  # the key came from our dnsmasq
    tampered = verify_with_opendkim(resolv_conf, signed.replace(b"At noon?", b"At one?"))
    assert tampered.returncode != 0 and b"signature" in tampered.stderr.lower()
    lf_only = verify_with_opendkim(resolv_conf, signed.replace(b"\r\n", b"\n"))
    assert lf_only.returncode == 0, lf_only.stderr


def test_arc_chain_of_two_forwarders_passes_arc_verify(dns_peer: DnsPeer, keys: Keys) -> None:
    dns = lookup(dns_peer)
    first = seal(MESSAGE, domain=OURS, selector="md1", private_key_pem=keys.ours[0], authserv_id=AUTHSERV,
                 results=f"{AUTHSERV}; spf=pass smtp.mailfrom=alice@sender.test", now=time.time(), dnsfunc=dns)
    once = first + MESSAGE
    second = seal(once, domain="hop2.test", selector="md1", private_key_pem=keys.hop2[0],
                  authserv_id="mx.hop2.test", results="mx.hop2.test; spf=fail smtp.mailfrom=x@fwd.test",
                  now=time.time(), dnsfunc=dns)
    twice = second + once
    cv, results, _ = dkim.arc_verify(twice, dnsfunc=dns)
    assert cv == b"pass"
    assert [r["instance"] for r in results] == [2, 1]
    assert second.startswith(b"ARC-Seal: i=2; cv=pass;")


# -- inbound verdicts through dnsmasq ---------------------------------------------------------


def verdicts_for(peer: DnsPeer, data: bytes, *, ip: str = SENDER_IP, mail_from: str = "alice@sender.test") -> Verdicts:
    return asyncio.run(check(data, client_ip=ip, helo="mail.sender.test", mail_from=mail_from,
                             authserv_id=AUTHSERV, resolver=peer.sync_resolver(), timeout=3.0))


def sender_signed(keys: Keys, selector: str = "s1", message: bytes = MESSAGE) -> bytes:
    return DkimSigner("sender.test", selector, keys.sender[0]).sign(message) + message


@pytest.mark.parametrize(
    ("case", "expected_dkim", "expected_dmarc"),
    [("good", "pass", "pass"), ("body modified", "fail", "fail"), ("wrong key", "fail", "fail"),
     ("missing key", "permerror", "fail")],
)
def test_inbound_dkim_and_dmarc(dns_peer: DnsPeer, keys: Keys, case: str, expected_dkim: str, expected_dmarc: str) -> None:
    data = {
        "good": sender_signed(keys),
        "body modified": sender_signed(keys).replace(b"At noon?", b"At one?"),
        "wrong key": sender_signed(keys, "s2"),
        "missing key": sender_signed(keys, "s9"),
    }[case]
    verdicts = verdicts_for(dns_peer, data, ip="203.0.113.50")  # SPF fails: DMARC rests on DKIM
    assert (verdicts.spf, verdicts.dkim, verdicts.dmarc) == ("fail", expected_dkim, expected_dmarc)
    assert verdicts.authentication_results.startswith(AUTHSERV + ";")
    assert f"dkim={expected_dkim}" in verdicts.authentication_results
    assert f"dmarc={expected_dmarc}" in verdicts.authentication_results


@pytest.mark.parametrize(
    ("mail_from", "ip", "expected"),
    [("alice@sender.test", SENDER_IP, "pass"), ("alice@sender.test", "203.0.113.50", "fail"),
     ("bob@soft.test", SENDER_IP, "softfail"), ("carol@nospf.test", SENDER_IP, "none")],
)
def test_inbound_spf(dns_peer: DnsPeer, mail_from: str, ip: str, expected: str) -> None:
    verdicts = verdicts_for(dns_peer, MESSAGE, ip=ip, mail_from=mail_from)
    assert verdicts.spf == expected
    assert f"spf={expected} " in verdicts.authentication_results


def test_aligned_spf_alone_passes_dmarc(dns_peer: DnsPeer) -> None:
    assert verdicts_for(dns_peer, MESSAGE).dmarc == "pass"


def test_pyspf_passes_our_srs_envelope_from_our_ip(dns_peer: DnsPeer) -> None:
    envelope = SrsCodec([b"k"], OURS).forward("alice@sender.test", time.time())
    verdicts = verdicts_for(dns_peer, MESSAGE, ip=OUR_IP, mail_from=envelope)
    assert verdicts.spf == "pass"
    assert verdicts_for(dns_peer, MESSAGE, ip=SENDER_IP, mail_from=envelope).spf == "fail"
