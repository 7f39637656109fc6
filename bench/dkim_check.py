"""The DKIM variant's proof of signing: verify copies the stand-in kept against the run's key,
with two independent verifiers.

What it does: `check(messages, key, domain, selector)` verifies each kept message's DKIM
signature by `domain`/`selector` twice, with the public half of `key` (the private key the
system under test signs with, read by `openssl pkey`) served as the only TXT record
`<selector>._domainkey.<domain>`:
- dkimpy (`dkim.verify` of the top signature, which must be by `domain`/`selector`), and
- OpenDKIM's own verifier, `opendkim -t` in test mode with `TestDNSData` holding the record
  (so maildetour's dkimpy-made signatures are checked by another implementation, and OpenDKIM's
  by dkimpy);
and reads the ARC chain status (dkimpy `arc_verify`; "none" when the copy has no ARC set).
Returns plain counts for results.json.

Contract: reads the files, runs openssl and opendkim, writes only into a temporary directory;
no DNS (dkimpy gets the record as its `dnsfunc`, OpenDKIM from its test data set). Exposure:
bench-only. Failure: RuntimeError when openssl or opendkim fails to run; FileNotFoundError
when opendkim is missing (Debian: opendkim).
"""

from __future__ import annotations

import base64
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import dkim

from bench.opendkim import program

# `opendkim -t FILE` reports each signature it checked on stdout (exit 0 either way), e.g.
# "opendkim: FILE: verification (s=md1, d=example.com, 2048-bit key) succeeded".
_VERDICT = re.compile(r"verification \(s=([^ ,]+),? d=([^ ,]+)[^)]*\) (succeeded|failed)")
_VERIFY_CONF = "Mode v\nSyslog no\nTestDNSData file:{dns}\n"


def txt_record(key: Path) -> bytes:
    """The DKIM TXT record of the RSA private key in `key` (PEM)."""
    made = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"],
                          capture_output=True, timeout=30)
    if made.returncode != 0:
        raise RuntimeError(f"openssl pkey {key}: {made.stderr.decode(errors='replace')}")
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(made.stdout)


def opendkim_verdicts(message: Path, record: bytes, *, domain: str, selector: str) -> list[tuple[str, str, bool]]:
    """(selector, domain, passed) for each signature OpenDKIM checked on `message`, with
    `record` as the only TXT record, `<selector>._domainkey.<domain>`."""
    with tempfile.TemporaryDirectory(prefix="bench-dkim-") as tmp:
        dns, conf = Path(tmp) / "dns", Path(tmp) / "verify.conf"
        dns.write_bytes(f"{selector}._domainkey.{domain} ".encode() + record + b"\n")
        conf.write_text(_VERIFY_CONF.format(dns=dns))
        ran = subprocess.run([program("opendkim"), "-x", str(conf), "-t", str(message)],
                             capture_output=True, text=True, timeout=60)
    said = ran.stdout + ran.stderr
    found = [(s, d, verdict == "succeeded") for s, d, verdict in _VERDICT.findall(said)]
    if ran.returncode != 0 or not found and "message not signed" not in said:
        raise RuntimeError(f"opendkim -t {message} (exit {ran.returncode}): {said[-1000:]}")
    return found


def check(messages: list[Path], key: Path, *, domain: str, selector: str) -> dict[str, Any]:
    """How many of `messages` carry a valid DKIM signature by `domain`/`selector` (dkimpy,
    top signature; OpenDKIM, any), and their ARC chain verdicts."""
    record = txt_record(key)
    name = f"{selector}._domainkey.{domain}."

    def dnsfunc(query: Any, timeout: float = 5) -> bytes | None:
        asked = query.decode() if isinstance(query, bytes) else str(query)
        return record if asked.rstrip(".").lower() == name.rstrip(".") else None

    valid = by_opendkim = 0
    arc: dict[str, int] = {}
    for path in messages:
        data = path.read_bytes()
        signed = dkim.DKIM(data)
        if (signed.verify(dnsfunc=dnsfunc) and signed.domain == domain.encode()
                and signed.selector == selector.encode()):
            valid += 1
        if (selector, domain, True) in opendkim_verdicts(path, record, domain=domain, selector=selector):
            by_opendkim += 1
        cv, _results, _comment = dkim.arc_verify(data, dnsfunc=dnsfunc)
        status = cv.decode() if isinstance(cv, bytes) else str(cv)
        arc[status] = arc.get(status, 0) + 1
    return {"checked": len(messages), "dkim_pass": valid, "opendkim_pass": by_opendkim, "arc": arc,
            "d": domain, "s": selector}
