"""DNS that never answers for one zone: dnsmasq forwarding that zone to a UDP socket that
swallows every query (issue 10 #6: slow DNS of one sender).

What it does: `swallowing_udp()` binds a loopback UDP socket that is never read (queries sent
to it vanish, nothing ever answers) and yields its port. `running_dnsmasq_forwarding(workdir,
records, forwards)` runs the same dnsmasq as `tests.peers.dnsmasq` (the same `config_text`:
loopback only, no resolv.conf, `records` served authoritatively) plus `server=/zone/host#port`
for each of `forwards`, so names under those zones are forwarded there — to a swallowing socket,
they never get an answer, exactly like a sender whose name servers are dead.

Exposure: test-only; loopback only. Failure: as `tests.peers.dnsmasq` (RuntimeError with
dnsmasq's output when it does not start; skip by hand / fail in CI when dnsmasq is missing).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tests.peers import need, terminate
from tests.peers.dnsmasq import DnsPeer, DnsRecords, _name, _wait_answering, config_text
from tests.peers.ports import free_udp_tcp_port

_STOP_TIMEOUT = 10.0


@contextmanager
def swallowing_udp(host: str = "127.0.0.1") -> Iterator[int]:
    """A UDP port on `host` where every datagram is received by nobody."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((host, 0))
        yield sink.getsockname()[1]


@contextmanager
def running_dnsmasq_forwarding(workdir: Path, records: DnsRecords,
                               forwards: Mapping[str, tuple[str, int]],
                               *, host: str = "127.0.0.1") -> Iterator[DnsPeer]:
    """dnsmasq serving `records`, forwarding each zone of `forwards` to its (host, port)."""
    program = need("dnsmasq", "dnsmasq")
    if not host.startswith("127.") or any(not h.startswith("127.") for h, _ in forwards.values()):
        raise ValueError("the DNS peers must stay on loopback")
    port = free_udp_tcp_port(host)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    conf, log_path, out_path = workdir / "dnsmasq.conf", workdir / "dnsmasq.log", workdir / "dnsmasq.out"
    lines = [f"server=/{_name(zone)}/{to_host}#{to_port}" for zone, (to_host, to_port) in forwards.items()]
    conf.write_text(config_text(records, host=host, port=port, log_path=log_path) + "\n".join(lines) + "\n")
    with open(out_path, "ab") as out:
        proc = subprocess.Popen([program, f"--conf-file={conf}", "--no-daemon"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=workdir)
    try:
        _wait_answering(proc, host, port, out_path)
        yield DnsPeer(host=host, port=port, log_path=log_path)
    finally:
        terminate(proc, _STOP_TIMEOUT)


__all__ = ["running_dnsmasq_forwarding", "swallowing_udp"]
