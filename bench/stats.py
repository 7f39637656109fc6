"""Numbers to tables: percentiles, medians and ranges over rounds, ratios, the Markdown report.

Pure: plain values in, plain values and text out. Exposure: bench-only. Failure: ValueError on
an empty sample (a phase that measured nothing is a bug in the harness, not a result).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

# (metric key, label, unit, better, target ratio maildetour/postfix or None[, Postfix's key])
# better: "low" (latency) or "high" (rate); the target reads as "ratio <= x" or "ratio >= x" (the
# goals of issue 13; the IMAP detour path is held to the detour path's).
# Postfix's key, when given, is the figure of the recipe the row compares with (the IMAP detour
# path of maildetour against the recipe's detour path, which only reaches a POP box).
MEMORY_TARGET_MB = 100  # the deferred-queue run: RSS with 100,000 copies deferred (issue 13)
METRICS: tuple[tuple[Any, ...], ...] = (
    ("success.p50", "success path p50", "ms", "low", 0.5),
    ("success.p90", "success path p90", "ms", "low", None),
    ("success.p99", "success path p99", "ms", "low", 0.7),
    ("detour.p50", "detour path p50", "ms", "low", 0.4),
    ("detour.p90", "detour path p90", "ms", "low", None),
    ("detour.p99", "detour path p99", "ms", "low", None),
    ("imap_detour.p50", "detour into IMAP p50 (Postfix: its detour path)", "ms", "low", 0.4, "detour.p50"),
    ("imap_detour.p90", "detour into IMAP p90 (Postfix: its detour path)", "ms", "low", None, "detour.p90"),
    ("imap_detour.p99", "detour into IMAP p99 (Postfix: its detour path)", "ms", "low", None, "detour.p99"),
    ("idle_success.p50", "idle success p50", "ms", "low", 0.15),
    ("idle_success.p90", "idle success p90", "ms", "low", None),
    ("idle_detour.p50", "idle detour p50", "ms", "low", 0.07),
    ("idle_detour.p90", "idle detour p90", "ms", "low", None),
    ("throughput_0.accepted_per_s", "0% refused: accepted/s", "msg/s", "high", None),
    ("throughput_0.delivered_per_s", "0% refused: delivered/s", "msg/s", "high", 1.25),
    ("throughput_0.cpu_ms_per_msg", "0% refused: CPU per message", "ms", "low", 0.7),
    ("throughput_dkim.delivered_per_s", "0% refused, DKIM signing on: delivered/s", "msg/s", "high", None),
    ("throughput_dkim.cpu_ms_per_msg", "0% refused, DKIM signing on: CPU per message", "ms", "low", None),
    ("throughput_dkim.extra_cpu_ms_per_msg", "DKIM signing on: CPU per message added (same round)", "ms",
     "low", None),
    ("throughput_10.accepted_per_s", "10% refused: accepted/s", "msg/s", "high", None),
    ("throughput_10.delivered_per_s", "10% refused: delivered/s", "msg/s", "high", 1.25),
    ("throughput_10.cpu_ms_per_msg", "10% refused: CPU per message", "ms", "low", None),
)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), p in [0, 100]."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "min": min(values), "max": max(values)}


def lookup(result: dict[str, Any], key: str) -> float | None:
    node: Any = result
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node)


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    label: str
    unit: str
    better: str
    target: float | None
    values: dict[str, list[float]]  # system -> one value per round
    ratios: list[float]  # maildetour / postfix, per round (rounds where both ran)

    def median(self, system: str) -> float | None:
        vals = self.values.get(system) or []
        return statistics.median(vals) if vals else None

    def verdict(self) -> str:
        if self.target is None or not self.ratios:
            return ""
        ratio = statistics.median(self.ratios)
        met = ratio <= self.target if self.better == "low" else ratio >= self.target
        sign = "≤" if self.better == "low" else "≥"
        return f"{sign} {self.target:g}× {'met' if met else 'missed'}"


def summarize(rounds: list[dict[str, Any]]) -> list[Row]:
    rows = []
    for key, label, unit, better, target, *against in METRICS:
        keys = {"maildetour": key, "postfix": against[0] if against else key}
        values: dict[str, list[float]] = {}
        ratios = []
        for rnd in rounds:
            got = {s: lookup(rnd[s], keys[s]) for s in ("maildetour", "postfix") if s in rnd}
            for system, value in got.items():
                if value is not None:
                    values.setdefault(system, []).append(value)
            md, pf = got.get("maildetour"), got.get("postfix")
            if md is not None and pf:
                ratios.append(md / pf)
        if values and (not against or values.get("maildetour")):
            rows.append(Row(key, label, unit, better, target, values, ratios))
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _cell(row: Row, system: str) -> str:
    vals = row.values.get(system)
    if not vals:
        return "–"
    if len(vals) == 1:
        return _fmt(vals[0])
    return f"{_fmt(row.median(system))} ({_fmt(min(vals))}–{_fmt(max(vals))})"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| metric | unit | maildetour median (range) | Postfix recipe median (range) "
             "| ratio per round (maildetour/Postfix) | target |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        ratios = ", ".join(f"{r:.2f}" for r in row.ratios) or "–"
        lines.append(f"| {row.label} | {row.unit} | {_cell(row, 'maildetour')} | {_cell(row, 'postfix')} "
                     f"| {ratios} | {row.verdict()} |")
    return "\n".join(lines)


def signing_table(rounds: list[dict[str, Any]]) -> str:
    """Per round and system, what makes the DKIM rows valid: the copies the stand-in accepted
    that carried a DKIM-Signature, and the kept copies whose signature verified."""
    lines = ["| DKIM run: signing seen at the stand-in | round | copies signed / accepted "
             "| DKIM-Signature fields | kept copies verified: dkimpy, OpenDKIM (d=, s=) | their ARC chain |",
             "|---|---|---|---|---|---|"]
    for rnd in rounds:
        for system in ("maildetour", "postfix"):
            found = rnd.get(system, {}).get("throughput_dkim")
            if not found:
                continue
            ver = found["verified"]
            arc = ", ".join(f"{status} {n}" for status, n in sorted(ver["arc"].items()))
            lines.append(f"| {system} | {rnd['round']} | {found['signed_copies']} / {found['gmail_copies']} "
                         f"| {found['signatures']} | {ver['dkim_pass']} / {ver['checked']}, "
                         f"{ver.get('opendkim_pass', '–')} / {ver['checked']} (d={ver['d']}, s={ver['s']}) | {arc} |")
    return "\n".join(lines) if len(lines) > 2 else "(DKIM run skipped)"


def memory_table(memory: dict[str, Any] | None) -> str:
    if not memory:
        return "(memory run skipped)"
    target = "met" if memory["rss_deferred_mb"] <= MEMORY_TARGET_MB and memory["peak_rss_load_mb"] <= MEMORY_TARGET_MB \
        else "missed"
    return "\n".join([
        "| deferred-queue run (maildetour) | value |", "|---|---|",
        f"| messages deferred (size) | {memory['messages']} ({memory['size']} B body) |",
        f"| load time (accepted and attempted once) | {memory['load_seconds']:.1f} s |",
        f"| RSS with all of them deferred | {memory['rss_deferred_mb']:.1f} MB |",
        f"| peak RSS while loading | {memory['peak_rss_load_mb']:.1f} MB (target ≤ {MEMORY_TARGET_MB} MB: {target}) |",
        f"| restart with the queue full, until it listens | {memory['restart_seconds']:.2f} s |",
        f"| drain: restart until the last copy arrived | {memory['drain_seconds']:.1f} s "
        f"({memory['drain_per_s']:.0f} msg/s) |",
        f"| peak RSS while draining | {memory['peak_rss_drain_mb']:.1f} MB |",
    ])
