"""`python3 -m bench run [--quick] [...]`: the one entry command of the benchmark;
`python3 -m bench reliability [--quick] [...]`: the reliability figures (bench.reliability).

Argument parsing only; the work is in `bench.run`. Prints the tables when done. Exit codes:
0 ok, 1 a phase failed (its message on stderr), 2 usage. Needs root (Postfix's queue owners)
and the Debian packages postfix (smtp-source included), dovecot-imapd and openssl, opendkim
and opendkim-tools (the recipe's signer in the DKIM run), and python3-aiosmtpd or pip aiosmtpd.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from bench import reliability
from bench.run import QUICK, Plan, run

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=(
        "Benchmark maildetour side by side with the seed's two-MTA Postfix recipe."))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the benchmark and write results.json and results.md")
    p.add_argument("--quick", action="store_true", help="small counts, one round: checks the harness (<2 min)")
    p.add_argument("--systems", default="maildetour,postfix",
                   help="comma-separated, in the order of each round (default: maildetour,postfix)")
    p.add_argument("--rounds", type=int, help="rounds of each system (default 3, quick 1)")
    p.add_argument("--memory", type=int, help="messages for the deferred-queue run (0 skips it)")
    p.add_argument("--dkim", type=int,
                   help="messages for the throughput run with DKIM signing on (default 5000, quick 500; 0 skips it)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    p.add_argument("--maildetour-src", type=Path,
                   help="run the maildetour package in this directory (e.g. an unpacked `git archive`)")
    p.add_argument("--keep", action="store_true", help="keep the systems' working directories")
    p.add_argument("--gmail-chunking", choices=("on", "off"), default="on",
                   help="the stand-in gmail offers CHUNKING/BDAT as Gmail does (default on; off: the old stand-in)")
    reliability.add_arguments(sub.add_parser(
        "reliability", help="load held, faults survived, memory, fuzz counts: reliability.json and .md"))
    return parser


async def _cancellable(work: Coroutine[Any, Any, object]) -> None:
    """Run `work`; SIGTERM cancels it like Ctrl-C does, so every started process is stopped."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await task


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "reliability":
        return reliability.main(args, argv, _cancellable)
    plan = QUICK if args.quick else Plan()
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    if not systems or any(s not in ("maildetour", "postfix") for s in systems):
        print("bench: --systems takes maildetour and/or postfix", file=sys.stderr)
        return 2
    changes: dict[str, object] = {"systems": systems, "keep": args.keep,
                                  "gmail_chunking": args.gmail_chunking == "on"}
    if args.rounds is not None:
        changes["rounds"] = args.rounds
    if args.maildetour_src is not None:
        changes["maildetour_src"] = str(args.maildetour_src.resolve())
    if args.memory is not None:
        changes["memory"] = args.memory
    if args.dkim is not None:
        changes["dkim"] = args.dkim
    plan = dataclasses.replace(plan, **changes)  # type: ignore[arg-type]
    try:
        asyncio.run(_cancellable(run(plan, args.out, mode="quick" if args.quick else "full")))
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
