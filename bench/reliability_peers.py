"""Peers and probes of the reliability run: dnsmasq, a small tmpfs, memory sampling.

What it does: `Dnsmasq` serves MX and A records on a loopback port, and is stopped and started
again by PID (the DNS outage); `tmpfs` mounts a small tmpfs (root) and always unmounts it, and
`fill` writes into it until ENOSPC; `MemorySampler` samples the RSS of one process (or the
summed PSS of a process tree, `pss_kb`) while a run goes on.

Contract: loopback only; every process stopped by the PID we started; a mount undone before
`tmpfs` returns. Exposure: bench-only. Failure: RuntimeError naming what did not start.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from bench.proc import die_with_parent, memory_kb, terminate


# --- DNS ---------------------------------------------------------------------------------------
@dataclass
class Dnsmasq:
    """dnsmasq on host:port, authoritative for `zones`, serving `mx` (domain, exchange) and `a`
    (name, address) records; nothing is forwarded and /etc/dnsmasq.conf is not read."""

    workdir: Path
    host: str
    port: int
    zones: tuple[str, ...]
    mx: tuple[tuple[str, str], ...] = ()
    a: tuple[tuple[str, str], ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "dnsmasq.conf"
        lines = [f"port={self.port}", f"listen-address={self.host}", "bind-interfaces", "no-resolv",
                 "no-hosts", "no-poll", "log-queries", f"log-facility={self.workdir / 'dnsmasq.log'}"]
        lines += [f"local=/{zone}/" for zone in self.zones]
        lines += [f"mx-host={domain},{exchange},10" for domain, exchange in self.mx]
        lines += [f"host-record={name},{address}" for name, address in self.a]
        conf.write_text("\n".join(lines) + "\n")
        with open(self.workdir / "dnsmasq.out", "ab") as out:
            self.proc = subprocess.Popen(["dnsmasq", f"--conf-file={conf}", "--no-daemon"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         preexec_fn=die_with_parent)
        deadline = time.monotonic() + 10
        query = dns.message.make_query("ready.invalid.", "A")
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited with {self.proc.returncode}: "
                                   + (self.workdir / "dnsmasq.out").read_text(errors="replace")[-500:])
            try:
                dns.query.udp(query, self.host, port=self.port, timeout=0.2)
                return
            except (OSError, dns.exception.Timeout):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"dnsmasq does not answer on {self.host}:{self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None

    def queries(self) -> int:
        """Queries dnsmasq logged so far (all runs on this workdir)."""
        try:
            text = (self.workdir / "dnsmasq.log").read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines() if "query[" in line)


# --- a small filesystem ------------------------------------------------------------------------
@contextmanager
def tmpfs(where: Path, size: str, mode: str = "0700") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (needs root); unmounted on the way out, whatever
    happened (lazily if something still holds it). Postfix needs `mode` 0755 (its daemons
    run as other users)."""
    if os.geteuid() != 0:
        raise RuntimeError("mounting a small tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs at {where}: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False, timeout=30)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem says ENOSPC; return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != 28:  # ENOSPC
                    raise
    finally:
        os.close(fd)
    return filler


# --- memory ------------------------------------------------------------------------------------
def pss_kb(pids: list[int]) -> int:
    """Summed proportional set size of `pids` in KiB (shared pages counted once in all)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


class MemorySampler:
    """Samples memory every `every` seconds: RSS of one process (`pid`), or the PSS sum of a
    process tree (`pids`, a callable returning the live PIDs). `peak_kb` is the highest sample;
    for one process, `hwm_kb()` is the kernel's own peak (VmHWM), which no sampling misses."""

    def __init__(self, *, pid: int | None = None, pids: Callable[[], list[int]] | None = None,
                 every: float = 0.1) -> None:
        self.pid, self.pids, self.every = pid, pids, every
        self.peak_kb = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> int:
        try:
            if self.pid is not None:
                now = memory_kb(self.pid)[0]
            else:
                assert self.pids is not None
                now = pss_kb(self.pids())
        except OSError:
            return 0
        self.peak_kb = max(self.peak_kb, now)
        self.samples += 1
        return now

    def hwm_kb(self) -> int:
        assert self.pid is not None
        try:
            return memory_kb(self.pid)[1]
        except OSError:
            return 0

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.every)

    def __enter__(self) -> MemorySampler:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sample()
