"""A real dnsmasq serving test DNS records (MX, A, TXT, PTR) on a loopback port.

What it does: `running_dnsmasq(workdir, records)` writes `workdir/dnsmasq.conf`, runs
`dnsmasq --conf-file=... --no-daemon` (foreground, no pid file, no user change), waits until it
answers a query, yields a `DnsPeer`, and stops it (SIGTERM to the PID it started) on exit.

Contract:
- listens only on `host:port` (UDP and TCP; `--listen-address --bind-interfaces`);
- never forwards anything: `no-resolv`, no `server=` lines, `no-hosts`, and the system's
  /etc/dnsmasq.conf is not read (an explicit `--conf-file` replaces it). A name outside every
  zone that has no record is answered REFUSED;
- for each zone (`local=/zone/`), a name without a record of any type gets NXDOMAIN; a name with
  records of other types gets NOERROR with no answer (NODATA);
- records: `mx-host` (exchange "." gives the RFC 7505 null MX "0 ."), `host-record` (A, plus
  its PTR), `ptr-record` (a PTR of its own for an IPv4 address; it wins over the one a
  `host-record` makes, so a test can make reverse and forward DNS disagree), `txt-record`
  (text longer than 255 bytes is split into several character-strings of at most 255 bytes;
  DNS clients join them, as DKIM verifiers do). TTL is 0. A reverse zone such as
  `2.0.192.in-addr.arpa` can be one of the zones, so an address without a PTR gets NXDOMAIN.
- TXT text must be printable ASCII; `"` and `\\` are escaped for dnsmasq's config syntax.

Exposure: test-only; loopback only. Failure: start-up problems raise RuntimeError with
dnsmasq's output; a missing dnsmasq skips/fails via `tests.peers.need`; bad record values raise
ValueError before anything starts.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.message
import dns.query
import dns.resolver

from tests.peers import need, terminate
from tests.peers.ports import free_udp_tcp_port

_START_TIMEOUT = 10.0  # seconds until dnsmasq must answer its first query
_STOP_TIMEOUT = 10.0
_TXT_CHUNK = 255  # one DNS character-string holds at most 255 bytes (RFC 1035 3.3)
_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_IPV4 = re.compile(r"(\d{1,3}\.){3}\d{1,3}")


@dataclass(frozen=True, slots=True)
class DnsRecords:
    """What the test DNS serves."""

    zones: tuple[str, ...] = ()  # authoritative here: unknown names -> NXDOMAIN, never forwarded
    mx: tuple[tuple[str, str, int], ...] = ()  # (domain, exchange, preference); "." = null MX
    a: tuple[tuple[str, str], ...] = ()  # (name, ipv4)
    txt: tuple[tuple[str, str], ...] = ()  # (name, text); long text is split into 255-byte strings
    ptr: tuple[tuple[str, str], ...] = ()  # (ipv4, name): the reverse record of the address


@dataclass(frozen=True, slots=True)
class DnsPeer:
    """A running dnsmasq and resolvers pointed only at it."""

    host: str
    port: int
    log_path: Path

    def resolver(self, timeout: float = 2.0) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=False)
        self._point(resolver, timeout)
        return resolver

    def sync_resolver(self, timeout: float = 2.0) -> dns.resolver.Resolver:
        resolver = dns.resolver.Resolver(configure=False)
        self._point(resolver, timeout)
        return resolver

    def _point(self, resolver: dns.resolver.BaseResolver, timeout: float) -> None:
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.timeout = timeout
        resolver.lifetime = timeout

    def log(self) -> str:
        """dnsmasq's log so far (queries are logged)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@contextmanager
def running_dnsmasq(
    workdir: Path, records: DnsRecords, *, host: str = "127.0.0.1", port: int | None = None
) -> Iterator[DnsPeer]:
    """Run dnsmasq on host:port (a free port if None) serving `records` until the block exits."""
    program = need("dnsmasq", "dnsmasq")
    if not host.startswith("127."):
        raise ValueError(f"dnsmasq peer must listen on loopback, not {host}")
    port = free_udp_tcp_port(host) if port is None else port
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    conf, log_path, out_path = workdir / "dnsmasq.conf", workdir / "dnsmasq.log", workdir / "dnsmasq.out"
    conf.write_text(config_text(records, host=host, port=port, log_path=log_path))
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(
            [program, f"--conf-file={conf}", "--no-daemon"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=workdir,
        )
    try:
        _wait_answering(proc, host, port, out_path)
        yield DnsPeer(host=host, port=port, log_path=log_path)
    finally:
        terminate(proc, _STOP_TIMEOUT)


def config_text(records: DnsRecords, *, host: str, port: int, log_path: Path) -> str:
    """The dnsmasq.conf for `records` (pure; raises ValueError for values it cannot express)."""
    lines = [
        f"port={port}",
        f"listen-address={host}",
        "bind-interfaces",
        "no-resolv",
        "no-hosts",
        "no-poll",
        "log-queries",
        f"log-facility={log_path}",
    ]
    for zone in records.zones:
        lines.append(f"local=/{_name(zone)}/")
    for domain, exchange, preference in records.mx:
        if not 0 <= preference <= 65535:
            raise ValueError(f"MX preference out of range: {preference}")
        target = "." if exchange in (".", "") else _name(exchange)
        lines.append(f"mx-host={_name(domain)},{target},{preference}")
    for name, address in records.a:
        lines.append(f"host-record={_name(name)},{_ipv4(address)}")
    for address, name in records.ptr:
        reverse = ".".join(reversed(_ipv4(address).split("."))) + ".in-addr.arpa"
        lines.append(f"ptr-record={reverse},{_name(name)}")
    for name, text in records.txt:
        lines.append(f"txt-record={_name(name)},{_txt_strings(text)}")
    return "\n".join(lines) + "\n"


def _ipv4(address: str) -> str:
    if not _IPV4.fullmatch(address) or any(int(part) > 255 for part in address.split(".")):
        raise ValueError(f"not an IPv4 address: {address!r}")
    return address


def _name(name: str) -> str:
    bare = name.rstrip(".")
    if not _NAME.fullmatch(bare) or ".." in bare:
        raise ValueError(f"unsupported DNS name for the test server: {name!r}")
    return bare


def _txt_strings(text: str) -> str:
    if not all(" " <= c <= "~" for c in text):
        raise ValueError(f"TXT text must be printable ASCII: {text[:40]!r}...")
    chunks = [text[i:i + _TXT_CHUNK] for i in range(0, len(text), _TXT_CHUNK)] or [""]
    return ",".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


def _wait_answering(proc: subprocess.Popen[bytes], host: str, port: int, out_path: Path) -> None:
    query = dns.message.make_query("ready.invalid.", "A")
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"dnsmasq exited with {proc.returncode}:\n{out_path.read_text(errors='replace')}"
            )
        try:
            dns.query.udp(query, host, port=port, timeout=0.2)
            return
        except (OSError, dns.exception.Timeout):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"dnsmasq does not answer on {host}:{port}") from None
            time.sleep(0.05)


__all__ = ["DnsPeer", "DnsRecords", "running_dnsmasq", "config_text"]
