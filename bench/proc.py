"""Process and port helpers for the bench: free ports, waiting for a port, CPU and memory.

What it does: `free_port` asks the kernel for a free loopback TCP port; `wait_port` polls until
something accepts there; `group_members`, `cpu_seconds_tree` and `memory_kb` read Linux /proc;
`die_with_parent` (a Popen preexec_fn) makes a child get SIGTERM when the bench dies, so an
interrupted run leaves no server behind.
Contract: loopback only; read-only on /proc. Exposure: bench-only. Failure: `wait_port` raises
TimeoutError (or RuntimeError when the process it waits for exits first).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child between fork and exec: ask Linux for SIGTERM when the parent thread exits."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(host: str, port: int, *, timeout: float,
              alive: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"process exited with {alive.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepts on {host}:{port} after {timeout}s")
        time.sleep(0.05)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a process the bench started: SIGTERM, then SIGKILL if it is still there after
    `timeout` seconds; reaped either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def children(pid: int) -> list[int]:
    """The direct children of `pid` (e.g. maildetour's SMTP intake workers), from /proc."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def wait_gone(pids: list[int], *, timeout: float) -> None:
    """Until every one of `pids` has exited (a zombie has: its sockets are closed)."""
    deadline = time.monotonic() + timeout
    while any((fields := _stat_fields(pid)) is not None and fields[0] != "Z" for pid in pids):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"processes {pids} still running after {timeout}s")
        time.sleep(0.01)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # fields from index 0 = state (field 3 in proc(5))


def group_members(group: int) -> list[int]:
    """PIDs of live (non-zombie) processes in process group `group`."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[2]) == group and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def cpu_seconds_tree(pid: int) -> float:
    """utime+stime of `pid`, of its reaped children (cutime+cstime), and of its live children."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (child := _stat_fields(int(entry.name))) and int(child[1]) == pid:
            ticks += int(child[11]) + int(child[12])
    return ticks / _TICKS


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in KiB: resident now, and the peak since it started."""
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm
