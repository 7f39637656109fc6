"""The benchmark harness works: its quick mode, maildetour half only, produces numbers of the
right shape (issue 5). Speed is never asserted here — only that every figure was measured.

Runs `python3 -m bench run --quick --systems maildetour` as a subprocess (about 45 s): the real
server, the stand-in gmail, smtp-source and the inotify watcher, all on loopback, and the run
with DKIM signing on (its copies verified by dkimpy and by OpenDKIM).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.run import QUICK
from bench.sink import refused_by_share
from bench.stats import percentile
from tests.peers import need

ROOT = Path(__file__).resolve().parents[2]


def test_the_stand_in_refuses_exactly_the_chosen_share_spread_evenly() -> None:
    refused = [k for k in range(1, 101) if refused_by_share(k, 0.1)]
    assert refused == list(range(10, 101, 10))
    assert not any(refused_by_share(k, 0.0) for k in range(1, 1000))
    assert all(refused_by_share(k, 1.0) for k in range(1, 1000))


def test_percentiles_interpolate_between_ranks() -> None:
    sample = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(sample, 50) == 50.5
    assert percentile(sample, 0) == 1.0 and percentile(sample, 100) == 100.0
    assert percentile([3.0], 99) == 3.0


def _distribution_ok(dist: dict[str, float], n: int) -> None:
    assert dist["n"] == n
    for key in ("p50", "p90", "p99", "min", "max"):
        assert math.isfinite(dist[key]), (key, dist)
    assert dist["min"] <= dist["p50"] <= dist["p90"] <= dist["p99"] <= dist["max"]


def test_quick_mode_measures_every_figure_for_maildetour(tmp_path: Path) -> None:
    need("smtp-source", "postfix")
    need("dovecot", "dovecot-imapd")
    need("opendkim", "opendkim")  # the DKIM run's second verifier
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--quick", "--systems", "maildetour", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    result = json.loads((out / "results.json").read_text())
    assert result["mode"] == "quick"
    assert [sorted(k for k in r if k != "round") for r in result["rounds"]] == [["maildetour"]]
    got = result["rounds"][0]["maildetour"]
    _distribution_ok(got["success"], QUICK.success)
    _distribution_ok(got["detour"], QUICK.detour)
    _distribution_ok(got["idle_success"], QUICK.idle)
    _distribution_ok(got["idle_detour"], QUICK.idle)
    assert len(got["success_ms"]) == QUICK.success and len(got["detour_ms"]) == QUICK.detour
    _distribution_ok(got["imap_detour"], QUICK.imap_detour)  # into Dovecot by IMAP APPEND
    for phase, share in (("throughput_0", 0.0), ("throughput_10", 0.1)):
        t = got[phase]
        assert t["messages"] == QUICK.throughput and t["refused_share"] == share
        assert t["accepted_per_s"] > 0 and t["delivered_per_s"] > 0 and t["cpu_seconds"] > 0

    signed = got["throughput_dkim"]  # signing on: every copy at the stand-in signed, kept ones verify
    assert signed["messages"] == QUICK.dkim and signed["signed_copies"] == signed["gmail_copies"] == QUICK.dkim
    verified = signed["verified"]
    assert verified["checked"] > 0 and verified["dkim_pass"] == verified["opendkim_pass"] == verified["checked"]
    assert signed["cpu_ms_per_msg"] > 0

    memory = result["memory"]
    assert memory["messages"] == QUICK.memory
    assert memory["rss_deferred_mb"] > 0 and memory["peak_rss_load_mb"] >= memory["rss_deferred_mb"]
    assert memory["drain_seconds"] > 0 and memory["peak_rss_drain_mb"] > 0

    table = (out / "results.md").read_text()
    assert "success path p50" in table and "deferred-queue run" in table and "detour into IMAP p50" in table
    assert "DKIM signing on: CPU per message" in table
    assert not (out / "work").exists()  # working directories are cleaned up
