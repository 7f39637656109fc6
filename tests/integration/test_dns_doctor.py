"""`maildetour dns records` and `maildetour dns check` against a real dnsmasq. Issue 12.

Publishing exactly what `dns records` prints makes `dns check` pass; each way a real zone goes
wrong (an MX elsewhere, a PTR that does not name our HELO, an SRS domain whose SPF refuses the
server, another DKIM key, a missing DMARC, two SPF records) is one line naming the record, and
exit 1. Lookups go only to the dnsmasq of the test (`delivery.dns_servers`).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from maildetour.sign.dkim_keys import generate_ed25519_key, generate_key
from tests.peers.dnsmasq import DnsRecords, running_dnsmasq
from tests.peers.ports import free_udp_tcp_port

IP = "192.0.2.10"  # the server's public address (TEST-NET-1: only ever data in the test DNS)
ZONES = ("example.com", "example.net", "2.0.192.in-addr.arpa")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "maildetour.cli", *args], capture_output=True, text=True,
                          timeout=60)


def write_config(folder: Path, dns_port: int) -> Path:
    generate_key(folder / "dkim.key", 1024)  # small: little CPU on a shared machine
    generate_ed25519_key(folder / "dkim-ed25519.key")
    config = folder / "maildetour.toml"
    config.write_text(f"""\
[server]
hostname = "mx.example.com"
[smtp]
domains = ["example.com"]
[delivery]
dns_servers = ["127.0.0.1:{dns_port}"]
[mailbox."ituki@pc.example.net"]
password = "change-me"
[signing]
domain = "example.com"
selector = "md1"
dkim_key = "dkim.key"
ed25519_selector = "md1e"
ed25519_key = "dkim-ed25519.key"
""")
    return config


def zone_records(text: str) -> DnsRecords:
    """The zone-file lines `dns records` prints, as what dnsmasq serves."""
    mx, a, txt, ptr = [], [], [], []
    for line in text.splitlines():
        if not line or line.startswith(";"):
            continue
        name, rtype, value = re.fullmatch(r"(\S+)\.\tIN (\w+)\t(.*)", line).groups()  # type: ignore[union-attr]
        match rtype:
            case "MX":
                preference, exchange = value.split()
                mx.append((name, exchange.rstrip("."), int(preference)))
            case "A":
                a.append((name, value))
            case "PTR":
                address = ".".join(reversed(name.removesuffix(".in-addr.arpa").split(".")))
                ptr.append((address, value.rstrip(".")))
            case "TXT":
                txt.append((name, "".join(re.findall(r'"([^"]*)"', value))))
    return DnsRecords(zones=ZONES, mx=tuple(mx), a=tuple(a), txt=tuple(txt), ptr=tuple(ptr))


def replaced(records: DnsRecords, **changes: object) -> DnsRecords:
    fields = {name: getattr(records, name) for name in ("zones", "mx", "a", "txt", "ptr")}
    return DnsRecords(**{**fields, **changes})  # type: ignore[arg-type]


def test_publishing_what_dns_records_prints_makes_dns_check_pass(tmp_path: Path) -> None:
    port = free_udp_tcp_port("127.0.0.1")  # the config names it before dnsmasq serves the records
    config = str(write_config(tmp_path, port))
    printed = cli("dns", "records", "--config", config, "--ip", IP)
    assert printed.returncode == 0, printed.stderr
    for wanted in ("example.com.\tIN MX\t10 mx.example.com.", "pc.example.net.\tIN MX\t10 mx.example.com.",
                   f'example.com.\tIN TXT\t"v=spf1 ip4:{IP} -all"', f"mx.example.com.\tIN A\t{IP}",
                   "10.2.0.192.in-addr.arpa.\tIN PTR\tmx.example.com.",
                   '_dmarc.example.com.\tIN TXT\t"v=DMARC1; p=none"',
                   'md1e._domainkey.example.com.\tIN TXT\t"v=DKIM1; k=ed25519; p='):
        assert wanted in printed.stdout
    assert "md1._domainkey.example.com.\tIN TXT\t\"v=DKIM1; k=rsa; p=" in printed.stdout

    with running_dnsmasq(tmp_path / "dns", zone_records(printed.stdout), port=port):
        checked = cli("dns", "check", "--config", config)  # the address comes from mx.example.com's A
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert all(line.startswith("ok ") for line in lines), lines
    for wanted in (f"ok      PTR {IP}: mx.example.com", f"ok      SPF example.com (SRS domain): pass for {IP}",
                   f"ok      SPF mx.example.com (HELO): pass for {IP}", "ok      MX pc.example.net: 10 mx.example.com",
                   "ok      DKIM md1._domainkey.example.com: rsa key matches ours",
                   "ok      DKIM md1e._domainkey.example.com: ed25519 key matches ours",
                   "ok      DMARC _dmarc.example.com: v=DMARC1; p=none"):
        assert wanted in lines


def test_dns_check_names_each_record_that_is_missing_or_wrong(tmp_path: Path) -> None:
    port = free_udp_tcp_port("127.0.0.1")  # the config names it before dnsmasq serves the records
    config = str(write_config(tmp_path, port))
    good = zone_records(cli("dns", "records", "--config", config, "--ip", IP).stdout)
    other_key = generate_ed25519_key(tmp_path / "other.key")
    broken = replaced(
        good,
        mx=tuple((d, "mx.elsewhere.example.net" if d == "example.com" else x, p) for d, x, p in good.mx),
        ptr=((IP, "vps-10.hoster.example.net"),),
        txt=tuple((name, {"example.com": "v=spf1 ip4:198.51.100.1 -all",
                          "md1e._domainkey.example.com": other_key}.get(name, text))
                  for name, text in good.txt
                  if name not in ("_dmarc.example.com", "md1._domainkey.example.com"))
        + (("mx.example.com", "v=spf1 -all"),),  # a second SPF record for the HELO name
    )
    with running_dnsmasq(tmp_path / "dns", broken, port=port):
        checked = cli("dns", "check", "--config", config)
    assert checked.returncode == 1
    assert checked.stderr.strip().splitlines() == [
        "maildetour: dns check: 7 of 11 records missing, wrong or not answered"]
    lines = checked.stdout.splitlines()
    for wanted in (
        f"wrong   PTR {IP}: names vps-10.hoster.example.net, not mx.example.com (our HELO)",
        "wrong   SPF mx.example.com (HELO): 2 v=spf1 records (receivers treat that as permerror)",
        "wrong   MX example.com: names mx.elsewhere.example.net, not mx.example.com",
        f"wrong   SPF example.com (SRS domain): fail for {IP}: 'v=spf1 ip4:198.51.100.1 -all' must allow this server",
        "missing DKIM md1._domainkey.example.com: publish the record of our rsa key (`maildetour dns records`)",
        "wrong   DKIM md1e._domainkey.example.com: publishes another key (or a revoked one) than the configured one",
        "missing DMARC _dmarc.example.com: publish \"v=DMARC1; p=none\" to start",
    ):
        assert wanted in lines, checked.stdout
    assert "ok      MX pc.example.net: 10 mx.example.com" in lines


def test_an_address_without_reverse_dns_and_outside_our_a_record_is_reported(tmp_path: Path) -> None:
    port = free_udp_tcp_port("127.0.0.1")  # the config names it before dnsmasq serves the records
    config = str(write_config(tmp_path, port))
    good = zone_records(cli("dns", "records", "--config", config, "--ip", IP).stdout)
    with running_dnsmasq(tmp_path / "dns", good, port=port):
        checked = cli("dns", "check", "--config", config, "--ip", "192.0.2.30")
    assert checked.returncode == 1
    lines = checked.stdout.splitlines()
    assert f"wrong   A/AAAA mx.example.com: {IP}: 192.0.2.30 missing" in lines
    assert ("missing PTR 192.0.2.30: no reverse DNS; ask whoever hosts the address to set it to mx.example.com"
            in lines)
    assert any(line.startswith("wrong   SPF example.com (SRS domain): fail for 192.0.2.30") for line in lines)


def test_dns_commands_refuse_a_bad_address_and_dns_trouble_is_an_error_line(tmp_path: Path) -> None:
    with running_dnsmasq(tmp_path / "dns", DnsRecords()) as refusing:  # no zones: every query REFUSED
        config = str(write_config(tmp_path, refusing.port))
        bad = cli("dns", "records", "--config", config, "--ip", "mx.example.com")
        assert bad.returncode == 1
        assert bad.stderr.strip() == "maildetour: --ip 'mx.example.com' is not an IPv4 or IPv6 address"
        checked = cli("dns", "check", "--config", config, "--ip", IP)
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    lines = checked.stdout.splitlines()
    assert lines and all(line.startswith("error   ") and "DNS did not answer" in line for line in lines), lines
