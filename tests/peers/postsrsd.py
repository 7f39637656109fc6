"""A real postsrsd (Debian 1.10) answering Postfix tcp_table lookups on loopback.

What it does: `running_postsrsd(workdir, domain, secret_file)` starts postsrsd in the
foreground with the given SRS domain and secret file (one secret a line, the first signs; the
same format maildetour's `[signing] srs_secret_file` uses), waits until both of its ports
accept connections, yields a `PostSrsd`, and stops it (SIGTERM to the PID it started) on exit.
`PostSrsd.forward(addr)` asks for the SRS form of an address (`get ADDR` on the forward port);
`PostSrsd.reverse(addr)` asks for the original address behind an SRS one (reverse port) and
returns (status, text): 200 and the address, or 500 for a forged/expired one.

Contract: listens on loopback only (`-l`); chrooted into a fresh directory under `workdir`;
drops root to `nobody` when run as root.
Exposure: test-only.
Failure: a missing postsrsd skips/fails through `tests.peers.need`; one that does not start
skips/fails through `peer_unavailable` with its output.
"""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.peers import need, peer_unavailable, terminate
from tests.peers.ports import free_port, wait_port

_STOP_TIMEOUT = 10.0
_IO_TIMEOUT = 5.0  # seconds for one tcp_table lookup


@dataclass(frozen=True, slots=True)
class PostSrsd:
    host: str
    forward_port: int
    reverse_port: int
    secret_file: Path

    def ask(self, port: int, address: str) -> tuple[int, str]:
        """One tcp_table lookup: `get ADDR` -> (status, decoded text)."""
        with socket.create_connection((self.host, port), timeout=_IO_TIMEOUT) as conn:
            conn.sendall(b"get " + urllib.parse.quote(address, safe="@=+/-._~!$&'*").encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
        status, _, text = reply.decode().strip().partition(" ")
        return int(status), urllib.parse.unquote(text)

    def forward(self, address: str) -> str:
        """postsrsd's SRS form of `address` (asserts status 200)."""
        status, text = self.ask(self.forward_port, address)
        assert status == 200, text
        return text

    def reverse(self, address: str) -> tuple[int, str]:
        """(200, original address) or (500, reason) for an SRS address."""
        return self.ask(self.reverse_port, address)


@contextmanager
def running_postsrsd(workdir: Path, domain: str, secret_file: Path, *,
                     host: str = "127.0.0.1") -> Iterator[PostSrsd]:
    """Run postsrsd for SRS `domain` with `secret_file` until the block exits."""
    program = need("postsrsd", "postsrsd")
    if not host.startswith("127."):
        raise ValueError(f"postsrsd peer must listen on loopback, not {host}")
    workdir.mkdir(parents=True, exist_ok=True)
    chroot = workdir / "chroot"
    chroot.mkdir(exist_ok=True)
    forward_port, reverse_port = free_port(host), free_port(host)
    command = [program, f"-s{secret_file}", f"-d{domain}", f"-f{forward_port}", f"-r{reverse_port}",
               f"-l{host}", f"-c{chroot}", "-4"]
    if os.geteuid() == 0:  # postsrsd drops root itself when asked
        command.append("-unobody")
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        try:
            wait_port(host, forward_port)
            wait_port(host, reverse_port)
        except TimeoutError:
            proc.kill()
            output = proc.communicate()[0].decode(errors="replace")
            peer_unavailable(f"postsrsd did not start: {output}")
        yield PostSrsd(host, forward_port, reverse_port, secret_file)
    finally:
        terminate(proc, _STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


__all__ = ["PostSrsd", "running_postsrsd"]
