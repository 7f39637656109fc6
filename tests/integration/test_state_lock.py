"""One server per state dir (issue 10, #11): two real `maildetour serve` on one state_dir."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.harness import Server, message, running_server, seed_text
from tests.peers.ports import free_port

PC = "ituki@pc.example.net"


def _serve(config: Path, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run a second `serve`; one that is still running after `timeout` is killed and reported
    as running (exit code None in the assertion's text)."""
    proc = subprocess.Popen([sys.executable, "-m", "maildetour.cli", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=config.parent)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"a second serve on the same state dir kept running:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _second_config(directory: Path, name: str, *, smtp_port: int) -> Path:
    """The seed config on another port, with the same state dir as the running server's."""
    config = directory / name
    config.write_text(seed_text(smtp_port=smtp_port, pop3_port=None, gmail="127.0.0.2:9"), encoding="utf-8")
    return config


def _pid_file(server: Server) -> str:
    return (server.state / "maildetour.pid").read_text().strip()


def test_a_second_serve_on_the_same_state_dir_exits_1_naming_the_holder(tmp_path: Path) -> None:
    """Issue 10, #11: a second serve on a free port would have run a second scheduler on the
    same queue; now it stops with one line naming the state dir and the first server's pid."""
    with running_server(tmp_path) as first:
        assert first.proc is not None
        result = _serve(_second_config(tmp_path, "second.toml", smtp_port=free_port()))
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"maildetour: {first.state}: state dir in use by another maildetour serve (pid {first.proc.pid})"]
        assert _pid_file(first) == str(first.proc.pid)
        first.send(message("still served", to=PC), to=(PC,))
        assert len(first.wait_mailbox(PC, 1)) == 1


def test_a_second_serve_that_cannot_bind_leaves_the_pid_file_alone(tmp_path: Path) -> None:
    """Issue 10, #11: a second serve on the same port used to fail to bind and then delete the
    running server's pid file (so `queue --flush` no longer reached it)."""
    with running_server(tmp_path) as first:
        assert first.proc is not None
        result = _serve(first.config)
        assert result.returncode == 1
        assert f"(pid {first.proc.pid})" in result.stderr and "Traceback" not in result.stderr
        assert _pid_file(first) == str(first.proc.pid)
        flushed = first.cli("queue", "--flush")
        assert flushed.returncode == 0 and f"asked the server (pid {first.proc.pid})" in flushed.stdout


def test_the_lock_goes_with_the_server_even_after_kill_9(tmp_path: Path) -> None:
    """No stale lock: after a clean stop or a kill -9, the next serve starts at once, and only
    the server that holds the lock writes and removes the pid file."""
    with running_server(tmp_path) as first:
        assert first.proc is not None
        first.kill()
        assert (first.state / "maildetour.pid").exists()  # killed: nobody removed it
        started = time.monotonic()
        first.start()
        assert time.monotonic() - started < 10
        assert _pid_file(first) == str(first.proc.pid)
        first.send(message("after the crash", to=PC), to=(PC,))
        first.wait_mailbox(PC, 1)
    assert not (first.state / "maildetour.pid").exists()
    assert (first.state / "maildetour.lock").exists()  # the lock file stays; the lock does not
    first.start()
    first.stop()
