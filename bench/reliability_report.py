"""The reliability run's result as Markdown tables: one section per part.

Pure: the JSON-able result in, text out. A part that failed shows its error; a part not run
is left out. Exposure: bench-only. Failure: a value missing from a part's result shows "–"
(the JSON holds everything the tables do not).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def _v(value: Any, digits: int = 1) -> str:
    if value is None or value == {}:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_v(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_v(v) for v in value) or "–"
    return str(value)


def _ms(dist: dict[str, Any] | None) -> str:
    if not dist or not dist.get("n"):
        return "none"
    return f"{dist['p50']:.1f} / {dist['p99']:.1f} (max {dist['max']:.0f}, n={dist['n']})"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_v(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _load(found: dict[str, Any]) -> list[str]:
    systems = [s for s in ("maildetour", "postfix") if s in found]
    out = ["## Load held (SMTP)", ""]
    rows = []
    for label, key, sub in (("calm: connect → 250, p50 / p99 ms", "baseline", "connect_to_250_ms"),
                            ("calm: 250 → both copies delivered, p50 / p99 ms", "baseline", "to_delivery_ms"),
                            ("attacked: connect → 250, p50 / p99 ms", "under_attack", "connect_to_250_ms"),
                            ("attacked: 250 → both copies delivered, p50 / p99 ms", "under_attack", "to_delivery_ms")):
        rows.append([label] + [_ms(found[s][key][sub]) for s in systems])
    for label, key in (("attacked: probes accepted (first try)", "accepted"), ("never accepted", "never_accepted"),
                       ("refusals met by probes", "refusals")):
        cells = []
        for s in systems:
            got = found[s]["under_attack"]
            cells.append(f"{got['accepted']} of {got['probes']} ({got['accepted_first_try']})"
                         if key == "accepted" else got[key])
        rows.append([label] + cells)
    out += _table(["figure", *systems], rows)
    out += ["Attackers (from 127.0.0.5: idle and slowloris; from 127.0.0.6: flooding senders):", ""]
    rows = []
    for s in systems:
        for g in found[s]["attackers"].get("groups", []):
            rows.append([s, f"{g['kind']} ×{g['count']}", g["tries"], g["greeted"], g["refused"], g["connect_failed"],
                         f"{g['closed_by_server']} (median {_v(g['held_seconds_median'])} s)", g["still_held"],
                         g["peak_held"], f"{g['messages_accepted']} / {_v(g['message_refusals'])}"
                         if g["kind"] == "flood" else ""])
    return out + _table(["system", "group", "connects", "greeted", "refused at greeting", "connect failed",
                         "cut off by the server (held)", "still held at the end", "peak held",
                         "messages accepted / refused"], rows)


def _pop3(found: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("calm", "one_address", "spread"):
        if name in found:
            got = found[name]
            att = (got.get("attackers") or {}).get("groups", [{}])[0]
            rows.append([name, got.get("addresses", 0), got["logins"], got["ok"], _ms(got["login_ms"]),
                         got["refused"], att.get("greeted", "–"), att.get("refused", "–")])
    return ["## POP3 owner during a flood", ""] + _table(
        ["flood", "attacker addresses", "owner logins", "ok", "login p50 / p99 ms", "refused",
         "attackers greeted", "attackers refused"], rows)


def _counts(got: dict[str, Any]) -> list[tuple[str, Any]]:
    return [("acknowledged (250 read by the client)", got.get("acknowledged")),
            ("delivered exactly to their targets", got.get("exactly_once")),
            ("lost", f"{got.get('lost')} {_v(got.get('lost_examples'))}"),
            ("duplicated (messages; extra copies; PC / hidden copy)",
             (f"{got.get('duplicated')}; {got.get('extra_copies')}; "
              f"{got.get('duplicated_pc_copy')} / {got.get('duplicated_hidden_copy')}")),
            ("hidden copy in the wrong place", got.get("hidden_copy_elsewhere")),
            ("not acknowledged (of which delivered anyway)",
             f"{got.get('not_acknowledged')} ({got.get('not_acknowledged_but_delivered')})"),
            ("queue left at the end", got.get("queue_left") or "empty"),
            ("errors in the server log (tracebacks; Postfix: fatal/panic)",
             f"{got.get('tracebacks')}: {_v(got.get('errors'))}" if got.get("tracebacks") else 0)]


def _kill(got: dict[str, Any]) -> list[tuple[str, Any]]:
    restarts = sorted(k["restart_seconds"] for k in got.get("kill_log", []))
    aimed: dict[str, int] = {}
    for k in got.get("kill_log", []):
        aimed[k["aimed"]] = aimed.get(k["aimed"], 0) + 1
    landing = got["kills_landing"]
    return [("kills (SIGKILL, restart at once)", got["kills"]), ("aimed at", aimed),
            ("kills that found a client sending DATA", landing["in_data"]),
            ("… a client waiting for the 250 after its dot (mid-commit)", landing["awaiting_250"]),
            ("… acknowledged messages not yet delivered (mid-delivery)", landing["acked_undelivered"]),
            ("… a copy refused by the stand-in, not yet in the detour Maildir (mid-detour)",
             landing["refused_not_yet_detoured"]),
            ("restart until listening, median / max s",
             f"{restarts[len(restarts) // 2]:.2f} / {restarts[-1]:.2f}" if restarts else "–"),
            ("queue drained after the last restart, s", got.get("drain_seconds")),
            ("client outcomes", got.get("client_outcomes")), *_counts(got)]


def _disk(got: dict[str, Any]) -> list[tuple[str, Any]]:
    keys = ("before", "queued", "queued_detoured_before_full", "while_full", "serving_while_full",
            "serving_at_end_of_full", "detour_arrivals_while_full", "server_exit_while_full",
            "restarted_after_space_returned", "after", "all_delivered_after_space_returned_s",
            "detour_attempts", "server_running_at_end")
    return [(k.replace("_", " "), got.get(k)) for k in keys] + _counts(got)


def _flap(got: dict[str, Any]) -> list[tuple[str, Any]]:
    return [("timeline (s: stand-in state, acknowledged so far)",
             "; ".join(f"{t}s: {s}, {n}" for t, s, n in got["timeline"])),
            ("451 answers from the stand-in", got["stand_in_451_answers"]),
            ("attempts at the gmail destination", got["gmail_attempts"]),
            ("hidden copies at the stand-in / in the detour Maildir", f"{got['at_stand_in']} / {got['in_detour']}"),
            ("all delivered, s after the load stopped", got["drain_seconds"]), *_counts(got)]


def _dns(got: dict[str, Any]) -> list[tuple[str, Any]]:
    return [("before the outage, via MX", got.get("via_mx_before")),
            ("sent during the outage", got.get("sent_during_outage")),
            ("at the end of the outage", got.get("after_outage")),
            ("all delivered, s after DNS returned", got.get("delivered_after_dns_back_s")),
            ("attempts at the gmail destination, whole run", got.get("gmail_attempts_total")), *_counts(got)]


def _side_by_side(title: str, rows_of: Any, found: dict[str, Any]) -> list[str]:
    """One column per system (`found` maps system -> result), or one when it is a single result."""
    per = found if "maildetour" in found else {"maildetour": found}
    columns = {name: rows_of(got) for name, got in per.items() if "error" not in got}
    first: list[tuple[str, Any]] = next(iter(columns.values()), [])
    rows = [[label] + [dict(c).get(label) for c in columns.values()] for label, _ in first]
    return [f"## {title}", ""] + _table(["figure", *columns], rows)


def _memory(got: dict[str, Any]) -> list[str]:
    rows = []
    for s, r in got.get("receive", {}).items():
        rows.append([f"{r['messages']} concurrent messages of {r['size']:,} octets, {s}",
                     f"idle {r['idle_mb']} MB, peak {r['peak_mb']} MB ({r['measure']}); "
                     f"{r['accepted']} accepted in {_v(r['accept_seconds'])} s, all delivered at "
                     f"{r['seconds_to_delivered']} s{'; CAPPED' if r['capped'] else ''}"])
    b = got.get("backlog")
    if b:
        rows.append([f"backlog of {b['accepted']} such messages, stand-in answering 451",
                     f"idle {b['idle_mb']} MB; RSS once all deferred {b['rss_deferred_mb']} MB; "
                     f"peak while loading {b['peak_load_mb']} MB"])
        rows.append(["the same backlog drained after a restart",
                     f"peak {b['peak_drain_mb']} MB; {b['drain_seconds']} s{'; CAPPED' if b['capped'] else ''}"])
    for key, r in got.get("lines", {}).items():
        rows.append([f"one such message alone, {key.split('_')[1]}-octet lines",
                     f"idle {r['idle_mb']} MB, peak {r['peak_mb']} MB"])
    return ["## Memory", ""] + _table(["run", "memory"], rows)


def _fuzz(got: dict[str, Any]) -> list[str]:
    if "tests" not in got:
        return ["## Bad inputs (fuzzing)", "", _v(got), ""]
    rows = [[name, t["file"], t["cases"], t["failing"], t["stopped"]] for name, t in got["tests"].items()]
    return ["## Bad inputs (fuzzing)", ""] + _table(["test", "file", "cases", "failing", "stopped"], rows) + [
        "pytest: " + "; ".join(got.get("summaries", [])), ""]


RENDER: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "load": _load, "pop3": _pop3, "memory": _memory, "fuzz": _fuzz,
    "kill": functools.partial(_side_by_side, "kill -9 under load", _kill),
    "disk": functools.partial(_side_by_side, "Disk full (a 48 MB tmpfs)", _disk),
    "flap": functools.partial(_side_by_side, "Downstream flapping", _flap),
    "dns": functools.partial(_side_by_side, "DNS outage (MX lookups through dnsmasq)", _dns)}


def render(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    out = [f"# Reliability run ({result.get('mode')}, {result.get('started')})", "",
           f"Command: `{result.get('command')}`", "",
           "Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()), ""]
    for name, part in result.get("parts", {}).items():
        found = part["result"]
        if "error" in found:
            out += [f"## {name}: FAILED after {part['seconds']} s", "", "```", found["error"], "```", ""]
            continue
        try:
            out += RENDER[name](found)
        except (KeyError, TypeError, IndexError) as exc:
            out += [f"## {name}", "", f"(no table: {type(exc).__name__} {exc}; see reliability.json)", ""]
        out += [f"({name}: {part['seconds']} s)", ""]
    if "seconds" in result:
        out.append(f"Whole run: {result['seconds']} s.")
    return "\n".join(out) + "\n"
