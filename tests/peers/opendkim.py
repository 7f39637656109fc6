"""opendkim-testmsg (Debian opendkim-tools, libopendkim) as an independent DKIM verifier.

What it does: `running_port53_dnsmasq(workdir, records)` runs dnsmasq on a random 127.53.x.y
address, port 53 (libopendkim's resolver reads /etc/resolv.conf and only ever uses port 53),
and yields the `DnsPeer` with a `resolv.conf` naming it written under `workdir`.
`verify_with_opendkim(resolv_conf, data)` runs `opendkim-testmsg` (verify mode: the message on
stdin, exit status 0 when the signature verifies) in a private mount namespace
(`unshare --mount`) where that resolv.conf is bind-mounted over /etc/resolv.conf; the machine's
own file is never changed and nothing else sees the mount.

Contract: loopback only. Needs root (mount namespace, port 53); without root, or when port 53
cannot be bound, the caller is skipped (or failed in CI) through `peer_unavailable`.
Exposure: test-only.
Failure: missing programs skip/fail through `tests.peers.need`.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.peers import need, peer_unavailable
from tests.peers.dnsmasq import DnsPeer, DnsRecords, running_dnsmasq

_RUN_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Port53Dns:
    peer: DnsPeer
    resolv_conf: Path  # names only `peer`; bind-mounted over /etc/resolv.conf for opendkim


@contextmanager
def running_port53_dnsmasq(workdir: Path, records: DnsRecords) -> Iterator[Port53Dns]:
    """dnsmasq serving `records` on a random 127.53.x.y:53, for opendkim-testmsg."""
    need("opendkim-testmsg", "opendkim-tools")
    need("unshare", "util-linux")
    if os.geteuid() != 0:
        peer_unavailable("opendkim-testmsg needs a private mount namespace and port 53: run as root")
    host = f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"
    workdir.mkdir(parents=True, exist_ok=True)
    resolv_conf = workdir / "resolv.conf"
    resolv_conf.write_text(f"nameserver {host}\noptions attempts:1 timeout:2\n")
    stack = ExitStack()
    try:  # only a start-up failure means "unavailable"; errors in the block pass through
        peer = stack.enter_context(running_dnsmasq(workdir / "dnsmasq", records, host=host, port=53))
    except RuntimeError as exc:
        peer_unavailable(f"cannot run dnsmasq on {host}:53: {exc}")
        raise
    with stack:
        yield Port53Dns(peer, resolv_conf)


def verify_with_opendkim(resolv_conf: Path, data: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run `opendkim-testmsg` on `data` with DNS from `resolv_conf`; returncode 0 = verified."""
    script = 'mount --bind "$0" /etc/resolv.conf && exec opendkim-testmsg'
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, str(resolv_conf)],
                          input=data, capture_output=True, timeout=_RUN_TIMEOUT, check=False)


__all__ = ["Port53Dns", "running_port53_dnsmasq", "verify_with_opendkim"]
