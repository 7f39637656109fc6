"""The DNS records a maildetour setup needs, and what is wrong with the ones found (issue 12).

What it does: `expected(facts)` lists the records to publish for a config's facts — MX of each
of our domains naming `server.hostname`; SPF of each domain, of the HELO name and (the one that
matters most) of the SRS domain, which is the envelope sender of every copy we forward; DKIM of
each configured key; a DMARC `p=none` to start with; with the server's addresses known, the
host name's A/AAAA and the PTR each address needs (forward-confirmed reverse DNS: PTR and HELO
agree). `zone_text` prints them as zone-file lines. The `check_*` functions compare resolved
answers (`Answer`) with what is expected and return one `Finding` each: ok, missing, wrong, or
error (DNS could not say). MTA-STS and TLS-RPT records are not listed: nothing in the config
serves an MTA-STS policy for our domains.

Pure: facts and answers in, values out; `dnsdoctor` does the lookups and the SPF evaluations.
Exposure: operator-facing text. Failure: none (bad answers are findings, not exceptions).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from maildetour.sign.dkim_keys import PublicKey, published_key, same_key

__all__ = ["Answer", "DkimKey", "Facts", "Finding", "Record", "check_dkim", "check_dmarc", "check_forward",
           "check_mx", "check_ptr", "check_spf", "expected", "reverse_name", "spf_text", "zone_text"]

MX_PREFERENCE = 10
DMARC_START = "v=DMARC1; p=none"  # watch first; p=quarantine or reject once reports look right
TXT_STRING = 255  # one DNS character-string holds at most 255 bytes (RFC 1035 3.3)


@dataclass(frozen=True, slots=True)
class DkimKey:
    selector: str
    domain: str
    key: PublicKey | None  # None: the configured key file cannot be read (`problem` says why)
    problem: str = ""

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True, slots=True)
class Facts:
    """What the records follow from: the config, the key files, the server's addresses."""

    hostname: str  # server.hostname: our HELO, the MX target, what PTRs must name
    domains: tuple[str, ...]  # every domain we accept mail for
    srs_domain: str | None  # the envelope sender domain of our forwarded copies
    dkim: tuple[DkimKey, ...]
    addresses: tuple[str, ...] = ()  # the server's public addresses, when known


@dataclass(frozen=True, slots=True)
class Record:
    name: str  # without the final dot
    rtype: str  # MX | TXT | A | AAAA | PTR
    value: str  # MX "10 host.", A/AAAA an address, PTR "host.", TXT the text (unquoted)
    note: str  # why it is needed, one line


@dataclass(frozen=True, slots=True)
class Answer:
    """What DNS said for one name and type."""

    values: tuple[str, ...] = ()  # MX "10 host", TXT the joined strings, A/AAAA addresses, PTR names
    error: str = ""  # timeout, SERVFAIL, REFUSED...: not known (NXDOMAIN and no data are just empty)


@dataclass(frozen=True, slots=True)
class Finding:
    status: str  # "ok" | "missing" | "wrong" | "error"
    what: str  # "MX example.com", "SPF example.com (SRS domain)", "PTR 192.0.2.10"...
    detail: str

    @property
    def line(self) -> str:
        return f"{self.status:<8}{self.what}: {self.detail}"


def spf_text(facts: Facts) -> str:
    """`v=spf1 ip4:... ip6:... -all` with the addresses, else `v=spf1 mx -all` (our domains'
    MX is this server)."""
    if not facts.addresses:
        return "v=spf1 mx -all"
    return "v=spf1 " + " ".join(("ip6:" if ":" in a else "ip4:") + a for a in facts.addresses) + " -all"


def expected(facts: Facts) -> list[Record]:
    """Every record to publish, in the order a zone editor wants them."""
    host = facts.hostname
    records = [Record(host, "AAAA" if ":" in a else "A", a, f"our host name (HELO) resolves to the server ({a})")
               for a in facts.addresses]
    records += [Record(reverse_name(a), "PTR", host + ".",
                       "reverse DNS, set where the address is hosted: must name our HELO, " + host)
                for a in facts.addresses]
    if host not in facts.domains:
        helo_spf = spf_text(facts) if facts.addresses else "v=spf1 a -all"
        records.append(Record(host, "TXT", helo_spf, "SPF of our HELO name: checked for our DSNs (empty sender)"))
    for domain in facts.domains:
        records.append(Record(domain, "MX", f"{MX_PREFERENCE} {host}.", f"mail for {domain} comes to {host}"))
    for domain in facts.domains:
        note = ("SPF of the SRS domain: the envelope sender of every forwarded copy" if domain == facts.srs_domain
                else f"SPF: add the mechanisms of any other server that sends as {domain}")
        records.append(Record(domain, "TXT", spf_text(facts), note))
    for key in facts.dkim:
        if key.key is not None:
            records.append(Record(key.name, "TXT", key.key.record, f"DKIM key {key.selector} ({key.key.algorithm})"))
    for domain in facts.domains:
        records.append(Record(f"_dmarc.{domain}", "TXT", DMARC_START,
                              "DMARC: start with p=none (add rua=mailto:... for reports)"))
    return records


def zone_text(records: list[Record], skipped: list[str]) -> str:
    """Zone-file lines, each after a comment saying why; `skipped` become comments too."""
    lines = [f"; {text}" for text in skipped]
    for record in records:
        value = txt_data(record.value) if record.rtype == "TXT" else record.value
        lines += [f"; {record.note}", f"{record.name}.\tIN {record.rtype}\t{value}"]
    return "\n".join(lines)


def txt_data(text: str) -> str:
    """TXT data as a zone file takes it: quoted strings of at most 255 bytes, in parentheses
    when there are several (a 2048-bit DKIM key needs two)."""
    chunks = [text[i:i + TXT_STRING - 5] for i in range(0, len(text), TXT_STRING - 5)] or [""]
    quoted = [f'"{c}"' for c in chunks]
    return quoted[0] if len(quoted) == 1 else "( " + " ".join(quoted) + " )"


def reverse_name(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer


# --- checks of resolved answers --------------------------------------------------------------
def _trouble(what: str, answer: Answer) -> Finding | None:
    return Finding("error", what, f"DNS did not answer: {answer.error}") if answer.error else None


def check_mx(domain: str, hostname: str, answer: Answer) -> Finding:
    what = f"MX {domain}"
    if (bad := _trouble(what, answer)) is not None:
        return bad
    targets = [value.split()[-1].rstrip(".").lower() for value in answer.values]
    if not targets:
        return Finding("missing", what, f"publish {MX_PREFERENCE} {hostname}.")
    if hostname.lower() in targets:
        return Finding("ok", what, ", ".join(sorted(answer.values)))
    if targets == [""]:
        return Finding("wrong", what, f"a null MX (\"0 .\"): nobody may send mail to {domain}")
    return Finding("wrong", what, f"names {', '.join(sorted(set(targets)))}, not {hostname}")


def spf_records(answer: Answer) -> list[str]:
    return [value for value in answer.values if value.lower().startswith("v=spf1") and
            (len(value) == 6 or value[6] == " ")]


def check_spf(name: str, role: str, answer: Answer, verdicts: dict[str, str], must_pass: bool) -> Finding:
    """SPF at `name`: present once; with `must_pass`, pyspf's verdict for each server address
    (`verdicts`, empty when no address is known) must be pass."""
    what = f"SPF {name}" + (f" ({role})" if role else "")
    if (bad := _trouble(what, answer)) is not None:
        return bad
    found = spf_records(answer)
    if not found:
        return Finding("missing", what, "no v=spf1 record")
    if len(found) > 1:
        return Finding("wrong", what, f"{len(found)} v=spf1 records (receivers treat that as permerror)")
    if not must_pass:
        return Finding("ok", what, found[0])
    if not verdicts:
        return Finding("ok", what, f"{found[0]} (not evaluated: no server address known)")
    failing = {ip: result for ip, result in verdicts.items() if result != "pass"}
    if failing:
        listed = ", ".join(f"{result} for {ip}" for ip, result in failing.items())
        return Finding("wrong", what, f"{listed}: {found[0]!r} must allow this server")
    return Finding("ok", what, f"pass for {', '.join(verdicts)}")


def check_dkim(key: DkimKey, answer: Answer) -> Finding:
    what = f"DKIM {key.name}"
    if key.key is None:
        return Finding("error", what, key.problem)
    if (bad := _trouble(what, answer)) is not None:
        return bad
    records = [value for value in answer.values if "p=" in value]
    if not records:
        return Finding("missing", what, f"publish the record of our {key.key.algorithm} key "
                                        "(`maildetour dns records`)")
    for record in records:
        published = published_key(record)
        if published is not None and same_key(published, key.key):
            return Finding("ok", what, f"{key.key.algorithm} key matches ours")
    return Finding("wrong", what, "publishes another key (or a revoked one) than the configured one")


def check_dmarc(domain: str, answer: Answer) -> Finding:
    what = f"DMARC _dmarc.{domain}"
    if (bad := _trouble(what, answer)) is not None:
        return bad
    found = [value for value in answer.values if value.replace(" ", "").lower().startswith("v=dmarc1;")
             or value.strip().lower() == "v=dmarc1"]
    if not found:
        return Finding("missing", what, f"publish \"{DMARC_START}\" to start")
    if len(found) > 1:
        return Finding("wrong", what, f"{len(found)} DMARC records (receivers then use none)")
    return Finding("ok", what, found[0])


def check_forward(hostname: str, given: tuple[str, ...], answers: list[Answer]) -> Finding:
    """The host name's A/AAAA (`answers`) must exist and hold every given address."""
    what = f"A/AAAA {hostname}"
    for answer in answers:
        if (bad := _trouble(what, answer)) is not None:
            return bad
    found = [value for answer in answers for value in answer.values]
    if not found:
        return Finding("missing", what, "our host name has no address (give --ip, or publish it)")
    absent = [a for a in given if ipaddress.ip_address(a) not in {ipaddress.ip_address(f) for f in found}]
    if absent:
        return Finding("wrong", what, f"{', '.join(found)}: {', '.join(absent)} missing")
    return Finding("ok", what, ", ".join(found))


def check_ptr(address: str, hostname: str, answer: Answer) -> Finding:
    """The PTR of one server address must name our HELO, `hostname` (FCrDNS with `check_forward`)."""
    what = f"PTR {address}"
    if (bad := _trouble(what, answer)) is not None:
        return bad
    names = [value.rstrip(".").lower() for value in answer.values]
    if not names:
        return Finding("missing", what, f"no reverse DNS; ask whoever hosts the address to set it to {hostname}")
    if hostname.lower() in names:
        return Finding("ok", what, hostname)
    return Finding("wrong", what, f"names {', '.join(names)}, not {hostname} (our HELO)")
