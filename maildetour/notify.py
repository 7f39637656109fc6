"""systemd's service notifications (sd_notify, for `Type=notify` units): READY, RELOADING,
STOPPING and a STATUS line.

What it does: `notify("READY=1", ...)` sends one datagram to the socket systemd names in
$NOTIFY_SOCKET (a path, or "@name" in the abstract namespace); without it (not started by
systemd) it does nothing. `reloading()` adds the MONOTONIC_USEC field newer systemd wants.
Exposure: internal (a local socket of systemd's). Failure: never raises: a notification that
cannot be sent is logged once and the server goes on (systemd then times the start out, which
says more than a crash would).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("maildetour")


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", "STATUS=...") to systemd; False when there is no one to tell."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode("utf-8", "replace"), address)
    except OSError as exc:
        log.warning("cannot notify systemd (%s)", exc.strerror or exc)
        return False
    return True


def reloading(status: str) -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", f"STATUS={status}")
