"""Running under systemd: the unit in the repo passes `systemd-analyze verify`, and the real
server tells systemd READY, RELOADING and STOPPING over $NOTIFY_SOCKET (Type=notify)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import seed_text
from tests.peers import need, terminate
from tests.peers.ports import free_port

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "maildetour.service"


def _directives(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_the_unit_asks_for_what_the_issue_names() -> None:
    unit = _directives(UNIT.read_text())
    assert unit["Type"] == "notify" and unit["ExecReload"].startswith("/opt/maildetour/bin/maildetour reload ")
    assert unit["User"] == "maildetour" and unit["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert unit["ProtectSystem"] == "strict" and unit["ReadWritePaths"] == "/var/lib/maildetour"
    assert unit["NoNewPrivileges"] == "yes" and unit["PrivateTmp"] == "yes"


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit as shipped, with ExecStart pointing at this checkout's console script (verify
    wants the program to exist)."""
    analyze = need("systemd-analyze", "systemd")
    program = Path(sys.executable).parent / "maildetour"
    assert program.exists(), f"{program}: the console script is installed with the package"
    text = UNIT.read_text().replace("/opt/maildetour/bin/maildetour", str(program))
    unit = tmp_path / "maildetour.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    ours = [line for line in result.stderr.splitlines() if "maildetour.service" in line]
    assert result.returncode == 0 and ours == [], result.stderr


def _datagrams(sock: socket.socket, until: str, timeout: float = 15.0) -> list[str]:
    """Notifications received until one contains `until`."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(until in text for text in seen):
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            raise AssertionError(f"no {until!r} from the server; got {seen}") from None
    return seen


def test_systemd_hears_ready_reloading_and_stopping(tmp_path: Path) -> None:
    config = tmp_path / "maildetour.toml"
    config.write_text(seed_text(smtp_port=free_port(), pop3_port=None, gmail="127.0.0.2:9"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        proc = subprocess.Popen([sys.executable, "-m", "maildetour", "serve", "--config", str(config)],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            [ready] = _datagrams(sock, "READY=1")
            assert f"MAINPID={proc.pid}" in ready.splitlines() and "STATUS=serving smtp" in ready
            proc.send_signal(signal.SIGHUP)
            reloading, ready_again = _datagrams(sock, "READY=1")
            fields = reloading.splitlines()
            assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")
            assert int(fields[1].split("=")[1]) <= time.monotonic_ns() // 1000
            assert ready_again.startswith("READY=1")
            proc.send_signal(signal.SIGTERM)
            [stopping] = _datagrams(sock, "STOPPING=1")
            assert stopping.startswith("STOPPING=1")
            assert proc.wait(15) == 0
        finally:
            terminate(proc)  # type: ignore[arg-type]
