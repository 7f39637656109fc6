"""Loopback port helpers for peer programs started by tests.

What it does: `free_port` asks the kernel for a TCP port that is free right now on a loopback
address; `wait_port` polls until something accepts connections on a port.
Contract: loopback only; `free_port` is best effort (another process may take the port between
the probe and the peer's bind — peers report that as a start-up failure).
Exposure: test-only, internal.
Failure: `wait_port` raises TimeoutError when nothing accepts within the timeout.
"""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` at the time of the call."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once a TCP connection to host:port succeeds; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepts on {host}:{port} after {timeout}s ({last_error})")
        time.sleep(0.05)


def free_udp_tcp_port(host: str = "127.0.0.1", attempts: int = 50) -> int:
    """Return a port free on `host` for both TCP and UDP (for DNS servers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(attempts):
        port = free_port(host)
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no port free for both TCP and UDP on {host} after {attempts} tries")
