"""`maildetour demo`: the seed scenario on loopback, in one command.

Writes `<dir>/maildetour.toml` (the seed config, `seed.toml`, relaying gmail.com to the
stand-in) if it is not there, then runs maildetour together with a stand-in "gmail" on
127.0.0.2:2526 that refuses any message containing the EICAR test string (552 5.7.0, as Gmail
refuses viruses) and keeps the rest in `<dir>/standin-gmail/` (a Maildir). For trying things
out, never for production.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from maildetour import logs
from maildetour.config import load_config
from maildetour.mailbox import maildir
from maildetour.seed import adapt, seed_text

STANDIN = ("127.0.0.2", 2526)
EICAR_MARK = b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE"

# The demo's own lines on top of the seed config.
DEMO_NOTE = """\
# The seed's setup (DESIGN.md) on loopback, written by `maildetour demo`. Try:
#   swaks --server 127.0.0.1:2525 --from a@sender.example --to ituki@example.com
#   maildetour trace --config {config} QUEUE-ID
"""
DEMO_DELIVERY = 'dns_servers = ["127.0.0.1:5399"]   # no DNS in the demo: other domains just wait'


def demo_config(config_path: Path) -> str:
    return DEMO_NOTE.replace("{config}", str(config_path)) + adapt(
        seed_text(), relay=f'"gmail.com" = "{STANDIN[0]}:{STANDIN[1]}"', delivery_extra=DEMO_DELIVERY)


class StandInGmail:
    """aiosmtpd handler: refuse EICAR like Gmail refuses viruses, keep everything else."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if EICAR_MARK in envelope.original_content:
            return "552 5.7.0 This message was blocked because its content presents a potential security issue."
        await asyncio.to_thread(maildir.deliver, self.root, envelope.original_content)
        return "250 2.0.0 OK stand-in gmail accepted"


async def _run(config_path: Path, standin_root: Path) -> None:
    from maildetour.app import App

    loop = asyncio.get_running_loop()
    standin = await loop.create_server(
        lambda: SMTP(StandInGmail(standin_root), hostname="mx.gmail.standin", ident="ESMTP"),
        host=STANDIN[0], port=STANDIN[1])
    try:
        await App(load_config(config_path)).run()
    finally:
        standin.close()


def run_demo(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "maildetour.toml"
    if not config_path.exists():
        config_path.write_text(demo_config(config_path), encoding="utf-8")
    logs.setup(logging.INFO)
    print(f"maildetour demo: config {config_path}; stand-in gmail on {STANDIN[0]}:{STANDIN[1]}",
          file=sys.stderr)
    asyncio.run(_run(config_path, directory / "standin-gmail"))
    return 0
