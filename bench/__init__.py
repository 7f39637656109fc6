"""maildetour's benchmark, side by side with the seed's two-MTA Postfix recipe.

What it does: `python3 -m bench run [--quick]` sets up both systems on loopback, drives them with
the same load generators (`smtp-source`, and a one-message-at-a-time client) into the same
downstream (a stand-in "gmail" that accepts, refuses a share with 552 5.7.0, or answers 4xx),
alternating A B A B, and writes JSON and a Markdown table. See docs/benchmarks.md.

Contract: loopback only; every process started here is stopped here, by PID or its own stop
command; nothing under maildetour/ or tests/ is imported except the `maildetour` CLI, which runs
as a subprocess. Exposure: a developer tool, never part of the server. Failure: a system that
does not start or does not deliver within a deadline aborts the run with a message naming it.
"""
