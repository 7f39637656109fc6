"""Issue 4 end to end: the real `maildetour serve` forwards like a trusted forwarder.

Over real sockets, with every DNS answer from a loopback dnsmasq and every judgement made by a
tool that is not ours:
- a forwarded copy has an SRS0 envelope sender that postsrsd reverses, a DKIM signature that
  opendkim-testmsg and dkimpy verify, an ARC set, and pyspf passes its envelope from 127.0.0.1;
  the local (Maildir) copy gets only our Authentication-Results;
- two maildetour instances in a row make an ARC chain that dkimpy validates (cv=pass);
- inbound SPF/DKIM/DMARC verdicts land in the delivered copy; forged results are removed;
- a late DSN to our SRS address detours a hidden copy (nobody hears of it) and turns into our
  own private DSN for an ordinary forward; a forged or expired SRS address is refused at RCPT;
- `skip_when = ["dmarc-fail"]` sends a failing message straight to the detour;
- `maildetour dkim keygen` / `maildetour check` on the signing keys.
"""

from __future__ import annotations

import base64
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import dns.exception
import dns.resolver
import nacl.signing
import pytest
import spf

from maildetour.config.model import SRS_HASH_LENGTH
from maildetour.sign.dkim import generate_key
from maildetour.sign.srs import SrsCodec, load_secrets
from tests.harness import Server, late_dsn, running_server
from tests.harness import message as harness_message
from tests.peers.dnsmasq import DnsPeer, DnsRecords, running_dnsmasq
from tests.peers.opendkim import Port53Dns, running_port53_dnsmasq, verify_with_opendkim
from tests.peers.postsrsd import PostSrsd, running_postsrsd
from tests.peers.sinks import running_sink

OURS = "example.com"  # our domain: SRS, DKIM d=, ARC d=
AUTHSERV = "mx.example.com"  # our hostname, hence our authserv-id
HOP2 = "b.example"  # the second maildetour in the chain test
PC = "ituki@pc.example.net"
HIDDEN = "ituki-ex@gmail.com"
DETOUR = "ituki@gm.example.net"
SENDER = "alice@sender.example"
SPF_REFUSES_LOOPBACK = "v=spf1 ip4:192.0.2.0/24 -all"


# -- peers shared by the module ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keys:
    """PEM private keys and their DKIM TXT records."""

    ours: Path
    ours_txt: str
    hop2: Path
    hop2_txt: str
    signed: bytes  # signed.example's key, for mail *to* us
    signed_txt: str
    ed25519: Path  # our optional second key: base64 of the 32-byte seed
    ed25519_txt: str


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    ours_txt = generate_key(folder / "ours.key")
    hop2_txt = generate_key(folder / "hop2.key")
    signed_txt = generate_key(folder / "signed.key")
    seed = nacl.signing.SigningKey.generate()
    (folder / "ed25519.key").write_bytes(base64.b64encode(bytes(seed)) + b"\n")
    ed25519_txt = "v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(seed.verify_key)).decode()
    return Keys(folder / "ours.key", ours_txt, folder / "hop2.key", hop2_txt,
                (folder / "signed.key").read_bytes(), signed_txt, folder / "ed25519.key", ed25519_txt)


def zones(keys: Keys) -> DnsRecords:
    return DnsRecords(
        # "example" too: with no record at the From domain, DMARC looks one level up, and a
        # name outside every zone would be REFUSED (a temperror) where real DNS says NXDOMAIN.
        zones=("example", OURS, HOP2, "sender.example", "signed.example", "strict.example", "soft.example"),
        txt=(
            (OURS, "v=spf1 ip4:127.0.0.0/8 -all"),
            (f"md1._domainkey.{OURS}", keys.ours_txt),
            (f"ed1._domainkey.{OURS}", keys.ed25519_txt),
            (HOP2, "v=spf1 ip4:127.0.0.0/8 -all"),
            (f"md1._domainkey.{HOP2}", keys.hop2_txt),
            ("sender.example", "v=spf1 ip4:127.0.0.0/8 -all"),  # no DMARC record: dmarc=none
            ("signed.example", SPF_REFUSES_LOOPBACK),  # DMARC must rest on DKIM
            ("s1._domainkey.signed.example", keys.signed_txt),
            ("_dmarc.signed.example", "v=DMARC1; p=reject"),
            ("strict.example", SPF_REFUSES_LOOPBACK),  # and no DKIM: DMARC fails
            ("_dmarc.strict.example", "v=DMARC1; p=reject"),
            ("soft.example", "v=spf1 ip4:192.0.2.0/24 ~all"),
        ),
    )


@pytest.fixture(scope="module")
def dns_peer(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[DnsPeer]:
    with running_dnsmasq(tmp_path_factory.mktemp("dns"), zones(keys)) as peer:
        yield peer


@pytest.fixture(scope="module")
def srs_secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("srs") / "srs.secret"
    path.write_text("e2e-current-secret-5d1\ne2e-retired-secret-0aa\n")
    return path


def txt_lookup(peer: DnsPeer) -> Callable[..., bytes | None]:
    """A dkimpy `dnsfunc` of our own (not maildetour's adapter): TXT through dnsmasq only."""
    resolver = peer.sync_resolver()

    def lookup(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(qname, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    return lookup


# -- configs ----------------------------------------------------------------------------------


def _template(text: str) -> str:
    """Escape braces for `str.format`, keeping the harness's {smtp_port} placeholder."""
    return text.replace("{", "{{").replace("}", "}}").replace("{{smtp_port}}", "{smtp_port}")


def config(*, dns: DnsPeer, key: Path, secret: Path, relays: dict[str, str], extra: str = "",
           hostname: str = AUTHSERV, domain: str = OURS, forwards: str | None = None,
           signing_extra: str = "") -> str:
    """The seed setup of DESIGN.md plus [signing]; next hops by `relays` (domain -> host:port)."""
    relay = ", ".join(f'"{d}" = "{hp}"' for d, hp in relays.items())
    routes = forwards if forwards is not None else f"""
[mailbox."{PC}"]
password = "x"
[mailbox."{DETOUR}"]
password = "x"
[forward."ituki@{OURS}"]
to = ["{PC}", "{HIDDEN}"]
[destination."{HIDDEN}"]
hidden = true
detour = "{DETOUR}"
"""
    return _template(f"""\
[server]
hostname  = "{hostname}"
state_dir = "var"
[smtp]
listen  = ["127.0.0.1:{{smtp_port}}"]
domains = ["{domain}"]
[delivery]
relay = {{ {relay} }}
dns_servers = ["{dns.host}:{dns.port}"]
retry_first = "300ms"
[signing]
domain          = "{domain}"
selector        = "md1"
dkim_key        = "{key}"
srs_secret_file = "{secret}"
{signing_extra}
{routes}
{extra}
""")


def message(subject: str, *, sender: str = SENDER, to: str = f"ituki@{OURS}",
            body: bytes = b"Hello.\r\n", extra_headers: str = "") -> bytes:
    """The harness's test message (it has the Date field libopendkim insists on) to our domain."""
    return harness_message(subject, sender=sender, to=to, body=body, extra_headers=extra_headers)


def header(data: bytes, name: str) -> list[str]:
    """Unfolded values of every `name` field in the header section of `data`."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    fields = re.split(r"\r\n(?![ \t])", head)
    prefix = name.lower() + ":"
    return [re.sub(r"\r\n[ \t]+", " ", f)[len(prefix):].strip() for f in fields
            if f.lower().startswith(prefix)]


# -- 1. what a forwarded copy carries -----------------------------------------------------------


@pytest.fixture(scope="module")
def port53(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Port53Dns]:
    with running_port53_dnsmasq(tmp_path_factory.mktemp("dns53"), zones(keys)) as peer:
        yield peer


@pytest.fixture(scope="module")
def postsrsd(tmp_path_factory: pytest.TempPathFactory, srs_secret: Path) -> Iterator[PostSrsd]:
    with running_postsrsd(tmp_path_factory.mktemp("postsrsd"), OURS, srs_secret) as peer:
        yield peer


def test_a_forwarded_copy_carries_srs_dkim_and_arc_that_other_tools_accept(
        tmp_path: Path, keys: Keys, dns_peer: DnsPeer, srs_secret: Path, postsrsd: PostSrsd,
        port53: Port53Dns, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_sink() as gmail:
        text = config(dns=dns_peer, key=keys.ours, secret=srs_secret,
                      relays={"gmail.com": f"{gmail.host}:{gmail.port}"},
                      signing_extra=f'ed25519_selector = "ed1"\ned25519_key = "{keys.ed25519}"')
        with running_server(tmp_path, text) as server:
            # From signed.example (which signs it), envelope from sender.example (SPF passes).
            server.send(signed_by_signed_example(keys, "forward me"), sender=SENDER)
            [copy] = gmail.wait_for(1)
            [local] = server.wait_mailbox(PC, 1)

    # SRS: our domain, and postsrsd (same secret) finds the original sender behind it.
    assert re.fullmatch(r"SRS0=[^@]+@example\.com", copy.mail_from), copy.mail_from
    assert copy.rcpt_tos == (HIDDEN,)
    assert postsrsd.reverse(copy.mail_from) == (200, SENDER)

    # DKIM: ours (rsa-sha256, then ed25519-sha256) on top of the sender's, which is untouched.
    signatures = [s.replace(" ", "") for s in header(copy.data, "DKIM-Signature")]
    assert [(_tag(s, "d"), _tag(s, "s"), _tag(s, "a")) for s in signatures] == [
        (OURS, "md1", "rsa-sha256"), (OURS, "ed1", "ed25519-sha256"), ("signed.example", "s1", "rsa-sha256")]
    lookup = txt_lookup(dns_peer)
    for index in range(3):
        assert _verifies(copy.data, index, lookup), signatures[index]
        assert not _verifies(copy.data.replace(b"noon", b"one"), index, lookup)
    # libopendkim on our rsa-sha256 signature alone (the other two removed), then tampered.
    ours_only = _only_signature(copy.data, "md1")
    assert ours_only.count(b"DKIM-Signature:") == 1
    verified = verify_with_opendkim(port53.resolv_conf, ours_only)
    assert verified.returncode == 0, verified.stderr
    assert f"md1._domainkey.{OURS}" in port53.peer.log()
    tampered = verify_with_opendkim(port53.resolv_conf, ours_only.replace(b"noon", b"one"))
    assert tampered.returncode != 0 and b"signature" in tampered.stderr.lower()

    # ARC: instance 1, sealing our inbound verdicts, valid for dkimpy.
    assert [s.split(";")[0] for s in header(copy.data, "ARC-Seal")] == ["i=1"]
    assert "cv=none" in header(copy.data, "ARC-Seal")[0]
    [aar] = header(copy.data, "ARC-Authentication-Results")
    assert aar.startswith(f"i=1; {AUTHSERV};") and "spf=pass" in aar and "dkim=pass" in aar
    assert "dmarc=pass" in aar and "arc=none" in aar
    cv, results, reason = dkim.arc_verify(copy.data, dnsfunc=txt_lookup(dns_peer))
    assert cv == b"pass", reason
    assert [r["instance"] for r in results] == [1]

    # SPF: pyspf alone (its own DNS function pointed at dnsmasq) passes the SRS envelope from
    # the address we sent from, and would fail it from anywhere else.
    resolver = dns_peer.sync_resolver()

    def pyspf_dns(name: str, qtype: str, strict: bool = True, timeout: float = 30) -> list[object]:
        try:
            answer = resolver.resolve(name, qtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.Timeout as exc:
            raise spf.TempError(str(exc)) from exc
        return [((name, qtype), r.strings if qtype == "TXT" else r.address) for r in answer]

    monkeypatch.setattr(spf, "DNSLookup", pyspf_dns)
    assert spf.check2(i="127.0.0.1", s=copy.mail_from, h=AUTHSERV)[0] == "pass"
    assert spf.check2(i="192.0.2.1", s=copy.mail_from, h=AUTHSERV)[0] == "fail"

    # The local copy: our verdicts, nothing of the outgoing additions.
    assert local.startswith(b"Return-Path: <alice@sender.example>\r\n")
    [results] = header(local, "Authentication-Results")
    assert results.startswith(f"{AUTHSERV}; spf=pass") and "dkim=pass" in results and "dmarc=pass" in results
    assert [_tag(s.replace(" ", ""), "d") for s in header(local, "DKIM-Signature")] == ["signed.example"]
    for absent in (b"SRS0", b"ARC-", f"d={OURS}".encode()):
        assert absent not in local


def _verifies(data: bytes, index: int, dnsfunc: Callable[..., bytes | None]) -> bool:
    """dkimpy's verdict on the index-th DKIM-Signature (from the top)."""
    try:
        return bool(dkim.DKIM(data).verify(idx=index, dnsfunc=dnsfunc))
    except dkim.DKIMException:
        return False


def _only_signature(data: bytes, selector: str) -> bytes:
    """`data` without the DKIM-Signature fields of other selectors."""
    head, body = data.split(b"\r\n\r\n", 1)
    fields = re.split(rb"\r\n(?![ \t])", head)
    kept = [f for f in fields if not f.lower().startswith(b"dkim-signature:")
            or _tag(re.sub(rb"\s", b"", f).decode(), "s") == selector]
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def _tag(signature: str, name: str) -> str:
    """A tag's value in an unfolded, space-free DKIM-Signature value."""
    found = re.search(rf"(?:^|;){name}=([^;]*)", signature)
    return found.group(1) if found else ""


# -- 2. two forwarders in a row -----------------------------------------------------------------


def test_two_maildetours_in_a_row_make_an_arc_chain_that_dkimpy_validates(
        tmp_path: Path, keys: Keys, dns_peer: DnsPeer, srs_secret: Path) -> None:
    with running_sink() as sink:
        second = config(dns=dns_peer, key=keys.hop2, secret=srs_secret, hostname=f"mx.{HOP2}",
                        domain=HOP2, relays={"sink.example": f"{sink.host}:{sink.port}"},
                        forwards=f'[forward."hop@{HOP2}"]\nto = ["final@sink.example"]\n')
        with running_server(tmp_path / "b", second) as b:
            first = config(dns=dns_peer, key=keys.ours, secret=srs_secret,
                           relays={HOP2: f"127.0.0.1:{b.smtp_port}"},
                           forwards=f'[forward."ituki@{OURS}"]\nto = ["hop@{HOP2}"]\n')
            with running_server(tmp_path / "a", first) as a:
                a.send(message("twice forwarded"))
                [copy] = sink.wait_for(1, timeout=20)

    assert re.fullmatch(rf"SRS1=[^@]+@{re.escape(HOP2)}", copy.mail_from), copy.mail_from
    cv, results, reason = dkim.arc_verify(copy.data, dnsfunc=txt_lookup(dns_peer))
    assert cv == b"pass", reason
    assert [r["instance"] for r in results] == [2, 1]
    seals = header(copy.data, "ARC-Seal")
    assert seals[0].startswith("i=2;") and "cv=pass" in seals[0] and "d=b.example" in seals[0]
    # The second hop saw the first one's work as it should: SPF of the SRS envelope and our
    # DKIM signature pass there, and the chain it continued was valid.
    aar2 = next(v for v in header(copy.data, "ARC-Authentication-Results") if v.startswith("i=2;"))
    assert "spf=pass" in aar2 and "dkim=pass" in aar2 and "header.d=example.com" in aar2
    assert "arc=pass" in aar2
    assert dkim.verify(copy.data, dnsfunc=txt_lookup(dns_peer))  # the top signature: b.example's


# -- 3. inbound verdicts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def verdict_server(tmp_path_factory: pytest.TempPathFactory, keys: Keys, dns_peer: DnsPeer,
                   srs_secret: Path) -> Iterator[Server]:
    """One server for the verdict cases; each case reads its own message from the PC box."""
    text = config(dns=dns_peer, key=keys.ours, secret=srs_secret, relays={"gmail.com": "127.0.0.1:9"})
    with running_server(tmp_path_factory.mktemp("verdicts"), text) as server:
        yield server


def signed_by_signed_example(keys: Keys, subject: str) -> bytes:
    data = message(subject, sender="alice@signed.example", body=b"Lunch at noon?\r\n")
    return dkim.sign(data, b"s1", b"signed.example", keys.signed,
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + data


@pytest.mark.parametrize(
    ("case", "mail_from", "spf_word", "dkim_word", "dmarc_word"),
    [
        ("dkim good", "alice@signed.example", "fail", "pass", "pass"),
        ("dkim body modified", "alice@signed.example", "fail", "fail", "fail"),
        ("spf pass", SENDER, "pass", "none", "none"),
        ("spf fail", "bob@strict.example", "fail", "none", "fail"),
        ("spf softfail", "carol@soft.example", "softfail", "none", "none"),
    ],
)
def test_inbound_verdicts_reach_the_delivered_copy(
        verdict_server: Server, keys: Keys, case: str, mail_from: str, spf_word: str,
        dkim_word: str, dmarc_word: str) -> None:
    subject = f"verdict {case}"
    match case:
        case "dkim good":
            data = signed_by_signed_example(keys, subject)
        case "dkim body modified":
            data = signed_by_signed_example(keys, subject).replace(b"noon", b"one")
        case _:
            data = message(subject, sender=mail_from)
    verdict_server.send(data, sender=mail_from)
    copy = _wait_subject(verdict_server, PC, subject)
    [ours] = [v for v in header(copy, "Authentication-Results") if v.startswith(AUTHSERV + ";")]
    assert f"; spf={spf_word} smtp.helo=client.test smtp.mailfrom={mail_from};" in ours
    if dkim_word == "none":  # no signature: dkim=none (issue 10 #12), one dkim result only
        assert "; dkim=none;" in ours and ours.count("dkim=") == 1
    else:
        assert f"dkim={dkim_word} " in ours and "header.d=signed.example" in ours
        if dkim_word == "fail":
            assert 'reason="body hash mismatch"' in ours
    assert f"dmarc={dmarc_word}" in ours


def test_forged_results_claiming_our_authserv_id_are_removed(verdict_server: Server) -> None:
    forged = (f"Authentication-Results: {AUTHSERV}; dmarc=pass header.from=sender.example\r\n"
              f"Authentication-Results: (looks legit)\r\n MX.Example.COM;\r\n dkim=pass header.d=sender.example\r\n"
              "Authentication-Results: mx.elsewhere.example; spf=pass smtp.mailfrom=sender.example\r\n")
    verdict_server.send(message("forged results", extra_headers=forged))
    copy = _wait_subject(verdict_server, PC, "forged results")
    results = header(copy, "Authentication-Results")
    assert [v for v in results if "example.com" in v.lower().split(";")[0]] == [results[0]]
    assert results[0].startswith(f"{AUTHSERV}; spf=pass") and "dmarc=none" in results[0]
    assert "dmarc=pass" not in results[0] and "dkim=pass" not in results[0]
    assert "mx.elsewhere.example; spf=pass smtp.mailfrom=sender.example" in results  # not ours: kept


def _wait_subject(server: Server, box: str, subject: str, timeout: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [b for b in server.mailbox(box) if f"\r\nSubject: {subject}\r\n".encode() in b]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{subject!r} not in {box}\n{server.log()}")


# -- 4. late bounces ---------------------------------------------------------------------------


ORDINARY_FORWARD = f"""
[forward."team@{OURS}"]
to = ["friend@example.org"]
"""


def test_late_bounce_of_a_hidden_copy_detours_it_and_tells_nobody(
        tmp_path: Path, keys: Keys, dns_peer: DnsPeer, srs_secret: Path) -> None:
    with running_sink() as gmail, running_sink() as sender_domain:
        text = config(dns=dns_peer, key=keys.ours, secret=srs_secret,
                      relays={"gmail.com": f"{gmail.host}:{gmail.port}",
                              "sender.example": f"{sender_domain.host}:{sender_domain.port}"})
        with running_server(tmp_path, text) as server:
            queue_id = server.send(message("accepted then refused"))
            [copy] = gmail.wait_for(1)
            server.wait_event(queue_id, "delivered", target=HIDDEN)
            assert server.mailbox(DETOUR) == []
            server.stop()  # the delivered copy is kept on disk for late bounces, not in memory
            server.start()

            dsn = late_dsn(to=copy.mail_from, reporter="gmail.com", final_recipient=HIDDEN,
                           returned=copy.data, marker="late-marker-1")
            dsn_id = server.send(dsn, sender="", to=(copy.mail_from,))

            [detoured] = server.wait_mailbox(DETOUR, 1)
            assert b"Subject: accepted then refused" in detoured
            assert b"late-marker-1" not in detoured  # the copy, not the report
            events = server.wait_event(queue_id, "detoured", target=DETOUR)
            assert any(e[0] == "detoured" and "late bounce" in e[2] and "5.7.1" in e[2] for e in events)
            assert any(e[0] == "late-bounce" and e[1] == HIDDEN for e in server.events(dsn_id))
            time.sleep(0.5)  # a DSN or forwarded report would have gone out by now
            assert sender_domain.messages == [] and sender_domain.attempts == 0
            assert len(gmail.messages) == 1  # and the report was not sent on to the hidden box
            assert all(b"late-marker-1" not in m for box in (PC, DETOUR) for m in server.mailbox(box))


def test_forged_or_expired_srs_addresses_are_refused_at_rcpt(
        tmp_path: Path, keys: Keys, dns_peer: DnsPeer, srs_secret: Path) -> None:
    codec = SrsCodec(load_secrets(srs_secret), OURS, hash_length=SRS_HASH_LENGTH)  # as the server makes them
    genuine = codec.forward(SENDER, time.time())
    tag, digest, rest = genuine.split("=", 2)
    forged = f"{tag}={'AAAAAAAA' if digest != 'AAAAAAAA' else 'BBBBBBBB'}={rest}"
    expired = codec.forward(SENDER, time.time() - 30 * 86400)
    # Issue 10 #4: libsrs2's 4-character hash of the very same secret is too short to be ours.
    short = SrsCodec(load_secrets(srs_secret), OURS).forward(SENDER, time.time())
    text = config(dns=dns_peer, key=keys.ours, secret=srs_secret, relays={"gmail.com": "127.0.0.1:9"})
    with running_server(tmp_path, text) as server, server.smtp() as client:
        client.mail("")
        for address in (forged, expired, short):
            code, reply = client.rcpt(address)
            assert (code, reply[:5]) == (550, b"5.1.1"), (address, code, reply)
        assert client.rcpt(genuine)[0] == 250
        assert client.rcpt(genuine.lower())[0] == 250  # relays may lowercase it


def test_late_bounce_of_an_ordinary_forward_becomes_our_own_private_dsn(
        tmp_path: Path, keys: Keys, dns_peer: DnsPeer, srs_secret: Path) -> None:
    with running_sink() as friend_host, running_sink() as sender_domain:
        text = config(dns=dns_peer, key=keys.ours, secret=srs_secret, extra=ORDINARY_FORWARD,
                      relays={"gmail.com": "127.0.0.1:9", "example.org": f"{friend_host.host}:{friend_host.port}",
                              "sender.example": f"{sender_domain.host}:{sender_domain.port}"})
        with running_server(tmp_path, text) as server:
            queue_id = server.send(message("for the team", to=f"team@{OURS}"), to=(f"team@{OURS}",))
            [copy] = friend_host.wait_for(1)
            server.wait_event(queue_id, "delivered", target="friend@example.org")
            dsn = late_dsn(to=copy.mail_from, reporter="example.org", final_recipient="friend@example.org",
                           returned=copy.data, marker="late-marker-2")
            server.send(dsn, sender="", to=(copy.mail_from,))

            [ours] = sender_domain.wait_for(1)
            server.wait_event(queue_id, "dsn-sent")
            time.sleep(0.3)
            assert len(sender_domain.messages) == 1  # ours only: the incoming report is not forwarded
    assert ours.mail_from == "" and ours.rcpt_tos == (SENDER,)
    assert f"Final-Recipient: rfc822; team@{OURS}".encode() in ours.data
    assert b"Status: 5.7.1" in ours.data
    assert f"From: Mail Delivery System <MAILER-DAEMON@{AUTHSERV}>".encode() in ours.data
    for private in (b"friend", b"example.org", b"late-marker-2"):
        assert private not in ours.data.lower(), private


def test_a_late_bounce_about_a_message_no_longer_kept_is_recorded_not_obeyed(
        tmp_path: Path, keys: Keys, dns_peer: DnsPeer, srs_secret: Path) -> None:
    with running_sink() as gmail:
        text = config(dns=dns_peer, key=keys.ours, secret=srs_secret,
                      relays={"gmail.com": f"{gmail.host}:{gmail.port}"})
        with running_server(tmp_path, text) as server:
            queue_id = server.send(message("a bounce we forward"), sender="")
            [copy] = gmail.wait_for(1)
            assert copy.mail_from == ""  # no SRS address: nothing may come back about this copy
            server.wait_event(queue_id, "delivered", target=HIDDEN)
            # Any valid SRS address of ours lets a report in; this one names that copy.
            srs = SrsCodec(load_secrets(srs_secret), OURS, hash_length=SRS_HASH_LENGTH).forward(SENDER, time.time())
            dsn = late_dsn(to=srs, reporter="gmail.com", final_recipient=HIDDEN, returned=copy.data,
                           marker="late-marker-3")
            dsn_id = server.send(dsn, sender="", to=(srs,))
            server.wait_event(dsn_id, "accepted")
            time.sleep(1.0)  # retry_first is 300ms: a retry loop shows by now
            assert "failed unexpectedly" not in server.log()
            assert _queued_copies(server) == 0
            assert server.mailbox(DETOUR) == []


def _queued_copies(server: Server) -> int:
    conn = sqlite3.connect(f"file:{server.state / 'queue.sqlite3'}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM copies WHERE state='queued'").fetchone()[0])
    finally:
        conn.close()


# -- 5. skip_when ------------------------------------------------------------------------------


def test_skip_when_dmarc_fail_detours_without_trying_the_hidden_destination(
        tmp_path: Path, keys: Keys, dns_peer: DnsPeer, srs_secret: Path) -> None:
    with running_sink() as gmail:
        text = config(dns=dns_peer, key=keys.ours, secret=srs_secret,
                      relays={"gmail.com": f"{gmail.host}:{gmail.port}"})
        text = text.replace(f'detour = "{DETOUR}"\n', f'detour = "{DETOUR}"\nskip_when = ["dmarc-fail"]\n')
        with running_server(tmp_path, text) as server:
            queue_id = server.send(message("spoofed", sender="bob@strict.example"), sender="bob@strict.example")
            [detoured] = server.wait_mailbox(DETOUR, 1)
            assert b"Subject: spoofed" in detoured
            [results] = [v for v in header(detoured, "Authentication-Results") if v.startswith(AUTHSERV)]
            assert "dmarc=fail" in results
            events = server.wait_event(queue_id, "detoured", target=DETOUR)
            assert any(e[0] == "detoured" and "skip_when" in e[2] for e in events)
            # The envelope sender is the sender's to choose: "dmarc=pass" in it is no verdict.
            tricky = "dmarc=pass@strict.example"
            server.send(message("spoofed again", sender="bob@strict.example"), sender=tricky)
            server.wait_mailbox(DETOUR, 2)
            assert gmail.attempts == 0 and gmail.connections == 0

            # A message that passes still goes to the hidden destination.
            server.send(message("genuine"))
            [delivered] = gmail.wait_for(1)
            assert b"Subject: genuine" in delivered.data
            assert len(server.mailbox(DETOUR)) == 2


# -- 6. the command line ------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "maildetour.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_dkim_keygen_writes_a_usable_key_and_check_names_a_missing_one(tmp_path: Path) -> None:
    conf = tmp_path / "maildetour.toml"
    conf.write_text(f"""\
[server]
hostname = "{AUTHSERV}"
[smtp]
listen = ["127.0.0.1:2525"]
domains = ["{OURS}"]
[signing]
domain = "{OURS}"
selector = "md1"
dkim_key = "keys/dkim.key"
srs_secret_file = "keys/srs.secret"
""")
    (tmp_path / "keys").mkdir()
    missing = cli("check", "--config", str(conf))
    assert missing.returncode == 1
    assert "signing.dkim_key" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1

    made = cli("dkim", "keygen", "--config", str(conf))
    assert made.returncode == 0, made.stderr
    key = tmp_path / "keys" / "dkim.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / "srs.secret").read_text().strip()
    [record_line] = [line for line in made.stdout.splitlines() if "IN TXT" in line]
    assert record_line.startswith(f"md1._domainkey.{OURS}. IN TXT (")
    record = "".join(re.findall(r'"([^"]*)"', record_line))
    assert record.startswith("v=DKIM1; k=rsa; p=")

    # The printed record is the public half of the written key: dkimpy verifies with it.
    data = message("keygen")
    signed = dkim.sign(data, b"md1", OURS.encode(), key.read_bytes()) + data
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record.encode()
                       if name == f"md1._domainkey.{OURS}.".encode() else None)

    assert cli("check", "--config", str(conf)).returncode == 0
    before = key.read_bytes()
    again = cli("dkim", "keygen", "--config", str(conf))
    assert again.returncode == 1 and "not overwriting" in again.stderr
    assert key.read_bytes() == before
