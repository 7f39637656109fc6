"""Real peer programs for tests (Postfix, dnsmasq, postsrsd, ...), started on loopback only.

`need(program)` finds a peer's binary. Run by hand without it, the test skips with a clear
reason; in CI (CI=true) a missing peer is a failure, because `.ci/run` must have installed it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def need(program: str, package: str | None = None) -> str:
    """Return the path of `program`, or skip (by hand) / fail (CI) when it is missing."""
    path = shutil.which(program) or shutil.which(program, path=os.pathsep.join(_SBIN))
    if path:
        return path
    reason = f"peer program {program!r} not found (Debian package {package or program})"
    if in_ci():
        pytest.fail(reason + "; .ci/run should have installed it")
    pytest.skip(reason)
    raise AssertionError("unreachable")


def peer_unavailable(reason: str) -> None:
    """Skip (by hand) or fail (CI) for a peer that is installed but cannot be used."""
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a peer this test started: SIGTERM to its PID, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
