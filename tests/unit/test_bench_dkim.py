"""The bench's DKIM variant proves signing rather than assuming it (issue 13): the stand-in counts
DKIM-Signature fields and keeps copies on request, and `bench.dkim_check` verifies them with two
independent verifiers (dkimpy and OpenDKIM's `opendkim -t`) against the run's key — and says
"no" for a copy that was changed after signing or never signed.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
from pathlib import Path
from types import SimpleNamespace

import dkim
import pytest

from bench.dkim_check import check
from bench.sink import SinkSettings, StandInGmail, control, dkim_signatures
from bench.stats import signing_table, summarize
from tests.peers import need

MESSAGE = (b"From: Alice <alice@sender.example>\r\nTo: <ituki@example.com>\r\nSubject: signed\r\n"
           b"Message-ID: <m1@sender.example>\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\n"
           + b"The quick brown fox jumps over the lazy dog.\r\n" * 20)


def test_the_stand_in_counts_dkim_signature_fields_in_the_header_only() -> None:
    assert dkim_signatures(MESSAGE) == 0
    two = b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=x\r\ndkim-signature: v=1; b=y\r\n" + MESSAGE
    assert dkim_signatures(two) == 2
    in_body = MESSAGE + b"\r\nDKIM-Signature: not a header\r\n"
    assert dkim_signatures(in_body) == 0
    assert dkim_signatures(b"X-DKIM-Signature: no\r\n" + MESSAGE) == 0


def test_the_stand_in_reports_the_count_and_keeps_the_asked_number_of_copies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    handler = StandInGmail(SinkSettings(signatures=True), out)
    monkeypatch.setattr("sys.stdout", io.StringIO())  # control() answers "ok" on stdout
    control(handler, f"keep 2 {tmp_path / 'kept dir'}")
    signed = b"DKIM-Signature: v=1; b=x\r\n" + MESSAGE
    for data in (signed, MESSAGE, signed):
        envelope = SimpleNamespace(original_content=data)
        assert asyncio.run(handler.handle_DATA(None, None, envelope)).startswith("250")
    assert [line.split()[2:] for line in out.getvalue().splitlines()] == [["A", "1"], ["A", "0"], ["A", "1"]]
    kept = sorted((tmp_path / "kept dir").iterdir())
    assert [p.name for p in kept] == ["1.eml", "2.eml"]
    assert kept[0].read_bytes() == signed and kept[1].read_bytes() == MESSAGE


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    openssl = need("openssl")
    path = tmp_path_factory.mktemp("dkim") / "key.pem"
    subprocess.run([openssl, "genrsa", "-out", str(path), "2048"], check=True, capture_output=True, timeout=60)
    return path


def test_both_verifiers_pass_a_good_signature_and_fail_a_changed_or_missing_one(key: Path, tmp_path: Path) -> None:
    need("opendkim", "opendkim")
    signed = dkim.sign(MESSAGE, b"md1", b"example.com", key.read_bytes(), linesep=b"\r\n") + MESSAGE
    good, changed, unsigned, other = (tmp_path / f"{n}.eml" for n in ("good", "changed", "unsigned", "other"))
    good.write_bytes(signed)
    changed.write_bytes(signed.replace(b"Subject: signed", b"Subject: changed"))
    unsigned.write_bytes(MESSAGE)
    other.write_bytes(dkim.sign(MESSAGE, b"zz9", b"example.com", key.read_bytes(), linesep=b"\r\n") + MESSAGE)

    assert check([good], key, domain="example.com", selector="md1") == {
        "checked": 1, "dkim_pass": 1, "opendkim_pass": 1, "arc": {"none": 1}, "d": "example.com", "s": "md1"}
    found = check([changed, unsigned, other], key, domain="example.com", selector="md1")
    assert (found["checked"], found["dkim_pass"], found["opendkim_pass"]) == (3, 0, 0)


def test_the_report_has_a_dkim_cpu_row_per_system_and_the_proof_of_signing() -> None:
    def system(cpu: float, signed_cpu: float) -> dict[str, object]:
        verified = {"checked": 3, "dkim_pass": 3, "opendkim_pass": 3, "arc": {"pass": 3}, "d": "example.com", "s": "s"}
        return {"throughput_0": {"cpu_ms_per_msg": cpu},
                "throughput_dkim": {"cpu_ms_per_msg": signed_cpu, "extra_cpu_ms_per_msg": signed_cpu - cpu,
                                    "delivered_per_s": 100.0, "signed_copies": 500, "gmail_copies": 500,
                                    "signatures": 500, "verified": verified}}

    rounds = [{"round": 1, "maildetour": system(3.0, 4.0), "postfix": system(3.0, 5.0)}]
    rows = {row.key: row for row in summarize(rounds)}
    cpu = rows["throughput_dkim.cpu_ms_per_msg"]
    assert cpu.values == {"maildetour": [4.0], "postfix": [5.0]} and cpu.ratios == [0.8]
    assert rows["throughput_dkim.extra_cpu_ms_per_msg"].values == {"maildetour": [1.0], "postfix": [2.0]}
    table = signing_table(rounds)
    assert "| maildetour | 1 | 500 / 500 | 500 | 3 / 3, 3 / 3 (d=example.com, s=s) | pass 3 |" in table
    assert "| postfix | 1 |" in table
