"""Inbound verdicts against DNS records served by a real dnsmasq on loopback (issue 10).

#12: DMARC is right for hyphenated and internationalised domains (authheaders 0.16.3 looked up
`_dmarc.spf` for `spf-pass.test`), `smtp.mailfrom` is always the whole MAIL FROM address, and an
unsigned message says `dkim=none`.
#6: a sender whose DNS never answers (dnsmasq forwards its zone to a socket that swallows every
query) delays only its own message: a legitimate message's checks finish in their own time
while eight slow ones are in flight, and the slow ones end in temperror at their deadline.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from maildetour.sign.dkim import DkimSigner, generate_key
from maildetour.verify.verdicts import Verdicts, check
from tests.harness import running_server
from tests.peers.dns_blackhole import running_dnsmasq_forwarding, swallowing_udp
from tests.peers.dnsmasq import DnsPeer, DnsRecords, running_dnsmasq

OURS = "mx.fwd.test"
GOOD_IP = "192.0.2.10"  # allowed by the senders' SPF records
BAD_IP = "203.0.113.5"
IDN = "bücher.test"
IDN_ASCII = "xn--bcher-kva.test"
SLOW = "never-answers.example"  # its name servers are dead: queries vanish


@dataclass(frozen=True, slots=True)
class Key:
    pem: bytes
    txt: str


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    folder = tmp_path_factory.mktemp("keys")
    made = {}
    for name in ("hyphen", "idn", "slow", "legit"):
        txt = generate_key(folder / name, 1024)  # small keys: little CPU on a shared machine
        made[name] = Key((folder / name).read_bytes(), txt)
    return made


def records(keys: dict[str, Key]) -> DnsRecords:
    spf = f"v=spf1 ip4:{GOOD_IP} ip4:127.0.0.0/8 -all"
    return DnsRecords(
        # "spf" as well: the name authheaders used to ask for (_dmarc.spf) has an answer here
        # (NXDOMAIN) as on the real internet, so only a right lookup can find the policy.
        zones=("test", "spf"),
        txt=(
            ("spf-pass.test", spf),
            ("_dmarc.spf-pass.test", "v=DMARC1; p=reject; sp=quarantine"),
            ("bounces.spf-pass.test", spf),
            ("other-site.test", spf),
            ("strict-align.test", spf),
            ("bounces.strict-align.test", spf),
            ("_dmarc.strict-align.test", "v=DMARC1; p=reject; aspf=s; adkim=s"),
            ("dk1._domainkey.dkim-signer.test", keys["hyphen"].txt),
            ("dkim-signer.test", f"v=spf1 ip4:{GOOD_IP} -all"),
            ("_dmarc.dkim-signer.test", "v=DMARC1; p=quarantine"),
            (IDN_ASCII, spf),
            (f"dk1._domainkey.{IDN_ASCII}", keys["idn"].txt),
            (f"_dmarc.{IDN_ASCII}", "v=DMARC1; p=reject"),
            ("legit.test", spf),
            ("dk1._domainkey.legit.test", keys["legit"].txt),
            ("_dmarc.legit.test", "v=DMARC1; p=reject"),
            ("_dmarc.spf", "v=DMARC1; p=none"),  # what a domain cut at '-' would have found
            ("mx-spf.test", "v=spf1 include:inc-spf.test mx -all"),
            ("inc-spf.test", "v=spf1 ip4:198.51.100.0/24 -all"),
        ),
        mx=(("mx-spf.test", "mail.mx-spf.test", 10), ("mx-spf.test", "backup.mx-spf.test", 20)),
        a=(("mail.mx-spf.test", "192.0.2.77"), ("backup.mx-spf.test", "192.0.2.78")),
    )


@pytest.fixture(scope="module")
def dns_peer(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Key]) -> Iterator[DnsPeer]:
    with running_dnsmasq(tmp_path_factory.mktemp("dns"), records(keys)) as peer:
        yield peer


def message(author: str, subject: str = "lunch") -> bytes:
    return (f"From: Alice <{author}>\r\nTo: bob@fwd.test\r\nSubject: {subject}\r\n"
            "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@fwd.test>\r\n\r\nAt noon?\r\n").encode()


def signed(key: Key, domain: str, data: bytes) -> bytes:
    return DkimSigner(domain, "dk1", key.pem).sign(data) + data


def verdicts(peer: DnsPeer, data: bytes, *, mail_from: str, ip: str = GOOD_IP,
             helo: str = "mail.sender.test", timeout: float = 5.0) -> Verdicts:
    return asyncio.run(check(data, client_ip=ip, helo=helo, mail_from=mail_from, authserv_id=OURS,
                             resolver=peer.sync_resolver(), timeout=timeout))


# --- #12: hyphens ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "author", "mail_from", "ip", "expected", "policy"),
    [
        ("aligned spf", "alice@spf-pass.test", "alice@spf-pass.test", GOOD_IP, ("pass", "pass"), "reject"),
        ("spoofed", "alice@spf-pass.test", "alice@spf-pass.test", BAD_IP, ("fail", "fail"), "reject"),
        ("spf of another site", "alice@spf-pass.test", "bounce@other-site.test", GOOD_IP, ("pass", "fail"), "reject"),
        ("relaxed: a subdomain's spf", "alice@spf-pass.test", "x@bounces.spf-pass.test", GOOD_IP, ("pass", "pass"), "reject"),
        ("strict: a subdomain's spf", "alice@strict-align.test", "x@bounces.strict-align.test", GOOD_IP, ("pass", "fail"), "reject"),
        ("subdomain author, org policy sp", "alice@mail.spf-pass.test", "bounce@other-site.test", GOOD_IP, ("pass", "fail"), "quarantine"),
    ],
)
def test_dmarc_of_hyphenated_domains(dns_peer: DnsPeer, case: str, author: str, mail_from: str, ip: str,
                                     expected: tuple[str, str], policy: str) -> None:
    """Issue 10 #12: `alice@spf-pass.test` looked up `_dmarc.spf`; spoofed mail got dmarc=none."""
    result = verdicts(dns_peer, message(author, case), mail_from=mail_from, ip=ip)
    assert (result.spf, result.dmarc) == expected, result.authentication_results
    assert result.dmarc_policy == policy
    header_from = author.rpartition("@")[2]
    assert f"header.from={header_from}" in result.authentication_results
    # The whole address, on every path (#12: sometimes only the domain was shown).
    assert f"smtp.mailfrom={mail_from}" in result.authentication_results
    assert "_dmarc.spf " not in dns_peer.log() and "_dmarc.spf\n" not in dns_peer.log()


def test_dkim_of_a_hyphenated_domain_carries_dmarc_and_unsigned_mail_says_dkim_none(
        dns_peer: DnsPeer, keys: dict[str, Key]) -> None:
    """Issue 10 #12: DKIM alignment with a hyphenated d=; `dkim=none` without a signature."""
    data = message("alice@dkim-signer.test", "dkim hyphen")
    good = verdicts(dns_peer, signed(keys["hyphen"], "dkim-signer.test", data), mail_from="x@other-site.test")
    assert (good.spf, good.dkim, good.dmarc, good.dmarc_policy) == ("pass", "pass", "pass", "quarantine")
    assert good.dkim_domains == ("dkim-signer.test",)
    unsigned = verdicts(dns_peer, data, mail_from="x@other-site.test")
    assert (unsigned.dkim, unsigned.dmarc) == ("none", "fail")
    assert "; dkim=none; dmarc=fail" in unsigned.authentication_results


def test_null_sender_shows_the_helo_identity_and_no_mailfrom(dns_peer: DnsPeer) -> None:
    result = verdicts(dns_peer, message("alice@spf-pass.test", "bounce"), mail_from="", helo="spf-pass.test")
    assert result.spf == "pass" and result.dmarc == "pass"  # RFC 7489: HELO when MAIL FROM is null
    assert "smtp.helo=spf-pass.test" in result.authentication_results
    assert "smtp.mailfrom" not in result.authentication_results


@pytest.mark.parametrize(("ip", "expected"), [
    ("198.51.100.9", "pass"), ("192.0.2.77", "pass"), ("192.0.2.78", "pass"), (BAD_IP, "fail")])
def test_spf_follows_include_and_mx_through_fetched_answers(dns_peer: DnsPeer, ip: str, expected: str) -> None:
    """pyspf evaluates again with each name fetched (include, MX, the MX hosts' addresses)."""
    result = verdicts(dns_peer, message("alice@mx-spf.test", "mx"), mail_from="alice@mx-spf.test", ip=ip)
    assert result.spf == expected


# --- #12: internationalised domains -------------------------------------------------------------
def test_internationalised_domains_are_looked_up_and_aligned_as_a_labels(
        dns_peer: DnsPeer, keys: dict[str, Key]) -> None:
    """Issue 10 #12: a From, MAIL FROM and d= in U-labels or A-labels are one domain."""
    data = message(f"alice@{IDN}", "idn")  # SMTPUTF8 mail: UTF-8 in the From field
    spf_only = verdicts(dns_peer, data, mail_from=f"alice@{IDN}")
    assert (spf_only.spf, spf_only.dkim, spf_only.dmarc) == ("pass", "none", "pass")
    assert f"header.from={IDN_ASCII}" in spf_only.authentication_results
    by_dkim = verdicts(dns_peer, signed(keys["idn"], IDN_ASCII, data), mail_from="x@other-site.test")
    assert (by_dkim.dkim, by_dkim.dmarc) == ("pass", "pass")
    spoofed = verdicts(dns_peer, data, mail_from=f"alice@{IDN}", ip=BAD_IP)
    assert (spoofed.spf, spoofed.dmarc, spoofed.dmarc_policy) == ("fail", "fail", "reject")


# --- #6: slow DNS of one sender ------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_dns(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Key]) -> Iterator[DnsPeer]:
    with swallowing_udp() as dead_port, running_dnsmasq_forwarding(
            tmp_path_factory.mktemp("slow-dns"), records(keys), {SLOW: ("127.0.0.1", dead_port)}) as peer:
        yield peer


def slow_message(keys: dict[str, Key], n: int) -> bytes:
    """From, MAIL FROM and DKIM d= all at the domain whose DNS never answers."""
    return signed(keys["slow"], SLOW, message(f"alice@{SLOW}", f"slow {n}"))


def test_a_legitimate_message_is_not_held_up_by_eight_slow_ones(
        slow_dns: DnsPeer, keys: dict[str, Key]) -> None:
    """Issue 10 #6: 8 messages whose DKIM d= (and SPF, and DMARC) domain never answers DNS
    raised a legitimate message's checks from 0.4 s to 20.9 s (they shared the default thread
    pool, each blocked on DNS). Now the legitimate checks finish while all eight are still
    waiting, and the eight end at their own deadline with temperror."""
    legit = signed(keys["legit"], "legit.test", message("alice@legit.test", "legit"))
    resolver = slow_dns.sync_resolver()
    slow_timeout = 4.0

    async def scenario() -> tuple[Verdicts, float, list[Verdicts], float]:
        started = time.monotonic()
        slow = [asyncio.ensure_future(check(
            slow_message(keys, n), client_ip=GOOD_IP, helo="mail.never-answers.example",
            mail_from=f"bob@{SLOW}", authserv_id=OURS, resolver=resolver, timeout=slow_timeout))
            for n in range(8)]
        await asyncio.sleep(0.3)  # all eight are waiting for DNS now
        before = time.monotonic()
        good = await check(legit, client_ip=GOOD_IP, helo="mail.legit.test", mail_from="alice@legit.test",
                           authserv_id=OURS, resolver=resolver, timeout=slow_timeout)
        legit_took = time.monotonic() - before
        assert not any(task.done() for task in slow), "a slow message finished before the legitimate one"
        results = await asyncio.gather(*slow)
        return good, legit_took, results, time.monotonic() - started

    good, legit_took, slow, total = asyncio.run(scenario())
    assert (good.spf, good.dkim, good.dmarc) == ("pass", "pass", "pass")
    assert legit_took < slow_timeout / 2, f"legitimate checks took {legit_took:.1f} s"
    for result in slow:  # the deadline: temperror, and the message goes on
        assert (result.spf, result.dkim, result.dmarc) == ("temperror", "temperror", "temperror")
    assert total < slow_timeout + 4, f"slow checks ran {total:.1f} s past a {slow_timeout} s deadline"


def test_slow_senders_do_not_delay_a_legitimate_250(tmp_path: Path, slow_dns: DnsPeer,
                                                    keys: dict[str, Key]) -> None:
    """Issue 10 #6 through the real server: while 8 sessions wait for DNS that never answers
    (`[checks] timeout = "3s"`), a legitimate message gets its 250 first; the slow ones get
    theirs at their deadline and are delivered with temperror."""
    config = f"""\
[server]
hostname  = "mx.example.com"
state_dir = "var"
[smtp]
listen  = ["127.0.0.1:{{smtp_port}}"]
domains = ["example.com"]
[delivery]
dns_servers = ["{slow_dns.host}:{slow_dns.port}"]
[checks]
inbound = true
timeout = "3s"
[mailbox."box@example.com"]
password = "x"
"""
    legit = signed(keys["legit"], "legit.test", message("alice@legit.test", "legit via smtp"))
    finished: dict[str, float] = {}
    lock = threading.Lock()

    with running_server(tmp_path, config) as server:
        def send(name: str, sender: str, data: bytes) -> None:
            with smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="client.test", timeout=30) as client:
                client.sendmail(sender, ["box@example.com"], data)
            with lock:
                finished[name] = time.monotonic()

        threads = [threading.Thread(target=send, args=(f"slow {n}", f"bob@{SLOW}", slow_message(keys, n)))
                   for n in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # the eight are in DATA, waiting for their checks
        started = time.monotonic()
        send("legit", "alice@legit.test", legit)
        legit_took = finished["legit"] - started
        slow_done_first = [name for name in finished if name != "legit"]
        for thread in threads:
            thread.join(30)
        copies = server.wait_mailbox("box@example.com", 9)

    assert not slow_done_first, f"{slow_done_first} got their 250 before the legitimate message"
    assert legit_took < 2.0, f"the legitimate DATA -> 250 took {legit_took:.1f} s"
    assert len(finished) == 9
    legit_copy = next(c for c in copies if b"Subject: legit via smtp" in c)
    assert b"dmarc=pass" in legit_copy.split(b"\r\n\r\n", 1)[0]
    slow_copies = [c for c in copies if b"Subject: slow" in c]
    assert len(slow_copies) == 8
    assert all(b"dmarc=temperror" in c.split(b"\r\n\r\n", 1)[0] for c in slow_copies)
