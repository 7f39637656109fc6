"""maildetour under test: the DESIGN.md seed config on loopback ports, run as `maildetour serve`.

What it does: `MaildetourSystem(workdir, port, pop3_port, gmail).start()` writes
`workdir/maildetour.toml` (the seed example, `maildetour/seed.toml`: example.com forwarded to
the PC mailbox and to the hidden gmail address, which detours to the gm.example.net mailbox;
gmail.com relayed to the stand-in gmail) and runs `python -m maildetour.cli serve --config ...`
as a child process. `delivery_extra` adds [delivery] keys (the memory run lengthens retries);
`flush()`, with the server stopped, makes every queued copy due now — what `maildetour queue
--flush` does with no server running, done here in SQL so that an older checkout run with
`--maildetour-src` is flushed the same way. `dkim` (the DKIM variant) adds `[signing]` with a
key made for the run by `maildetour dkim keygen` (2048-bit RSA), so every copy that leaves by
SMTP is DKIM-signed `d=example.com` and ARC-sealed, and `[checks] inbound = false`: the
inbound SPF/DKIM/DMARC verdicts that `[signing]` turns on by default are another job than
signing (the recipe's MTA1 has none), and here their DNS would go to a dead port and wait out
their 5 s deadline on every message.

Contract: loopback only; DNS goes to a dead loopback port (nothing may ask a real resolver);
stops its child by PID (SIGTERM, then SIGKILL after 20 s). Exposure: bench-only.
Failure: RuntimeError with the server's log tail when it does not listen within 15 s.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.proc import cpu_seconds_tree, die_with_parent, memory_kb, terminate, wait_port

# The seed config of the repository (the one the README shows and the tests run). It is read
# as a file, not imported: `--maildetour-src` may run another checkout's package.
SEED_FILE = Path(__file__).resolve().parents[1] / "maildetour" / "seed.toml"
DETOUR = 'detour       = "ituki@gm.example.net"'
DKIM_SELECTOR = "md1"
DKIM_KEY = "dkim.key"  # beside the config
SIGNING = f"""
[signing]
domain   = "example.com"
selector = "{DKIM_SELECTOR}"
dkim_key = "{DKIM_KEY}"

[checks]
inbound = false
"""


def seed_config(*, smtp_port: int, pop3_port: int, gmail: tuple[str, int], delivery_extra: str = "",
                detour_after: str = "10m", detour: str | None = None, extra: str = "") -> str:
    """The seed file with this run's ports, stand-in gmail and [delivery] additions (DNS goes
    to a dead loopback port: nothing may ask a real resolver); `detour` replaces the hidden
    destination's detour (a TOML value), `extra` tables are appended."""
    text = SEED_FILE.read_text(encoding="utf-8")
    changes = (
        ('"127.0.0.1:2525"', f'"127.0.0.1:{smtp_port}"'),
        ('"127.0.0.1:1100"', f'"127.0.0.1:{pop3_port}"'),
        ('"gmail.com" = "127.0.0.2:2525" }\n',
         f'"gmail.com" = "{gmail[0]}:{gmail[1]}" }}\ndns_servers = ["127.0.0.1:9"]\n{delivery_extra}\n'),
        ('detour_after = "10m"', f'detour_after = "{detour_after}"'),
        (DETOUR, f"detour       = {detour}" if detour else DETOUR),
    )
    for old, new in changes:
        if old not in text:
            raise RuntimeError(f"{SEED_FILE} has no {old.strip()} to adapt")
        text = text.replace(old, new, 1)
    return text + extra


@dataclass
class MaildetourSystem:
    workdir: Path
    smtp_port: int
    pop3_port: int
    gmail: tuple[str, int]
    delivery_extra: str = ""
    detour_after: str = "10m"
    detour: str | None = None  # the hidden destination's detour, as a TOML value
    extra: str = ""  # tables appended to the config
    src: Path | None = None  # a directory holding the maildetour package to run (default: importable one)
    dkim: bool = False  # sign every SMTP copy (the DKIM variant): [signing] and a key made for the run
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    name = "maildetour"

    @property
    def state(self) -> Path:
        return self.workdir / "var"

    def maildir(self, address: str) -> Path:
        return self.state / "mailboxes" / address

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "maildetour.toml"
        config.write_text(seed_config(smtp_port=self.smtp_port, pop3_port=self.pop3_port,
                                      gmail=self.gmail, delivery_extra=self.delivery_extra,
                                      detour_after=self.detour_after, detour=self.detour,
                                      extra=self.extra + (SIGNING if self.dkim else "")), encoding="utf-8")
        for address in ("ituki@pc.example.net", "ituki@gm.example.net"):
            for sub in ("tmp", "new", "cur"):  # made now so that a watcher can watch new/ at once
                (self.maildir(address) / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        env = dict(os.environ)
        if self.src is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.src.resolve()), env.get("PYTHONPATH", "")])
        if self.dkim:
            made = subprocess.run([sys.executable, "-m", "maildetour.cli", "dkim", "keygen", "--config", str(config)],
                                  capture_output=True, text=True, cwd=self.workdir, env=env, timeout=60)
            if made.returncode != 0:
                raise RuntimeError(f"maildetour dkim keygen failed: {made.stdout}{made.stderr}")
        with open(self.workdir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "maildetour.cli", "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                preexec_fn=die_with_parent)
        try:
            wait_port("127.0.0.1", self.smtp_port, timeout=15, alive=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"maildetour did not start ({exc}):\n{self.logs()}") from None

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=20)
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def dkim_key(self) -> Path | None:
        """The private key the copies are signed with (the DKIM variant), for checking them."""
        return self.workdir / DKIM_KEY if self.dkim else None

    def cpu_seconds(self) -> float:
        return cpu_seconds_tree(self.proc.pid) if self.proc else 0.0

    def memory_kb(self) -> tuple[int, int]:
        return memory_kb(self.pid)

    def logs(self, lines: int = 30) -> str:
        try:
            text = (self.workdir / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def flush(self) -> int:
        """Make every queued copy due now (server stopped); return how many there are."""
        if self.proc is not None:
            raise RuntimeError("flush() needs the server stopped")
        conn = sqlite3.connect(self.state / "queue.sqlite3", isolation_level=None)
        try:
            cur = conn.execute("UPDATE copies SET next_at = 0 WHERE state = 'queued'")
            return cur.rowcount
        finally:
            conn.close()
