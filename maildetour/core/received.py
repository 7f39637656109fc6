"""The Received header we add, and counting the ones already there (loop detection).

Pure. The header names the client and our host, never a forward target: `for <...>` carries
the public address only, and only when there is exactly one.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from email.utils import format_datetime

_RECEIVED = re.compile(rb"^received:", re.I | re.M)


def received_header(*, helo: str, client_ip: str, hostname: str, queue_id: str, protocol: str,
                    recipients: tuple[str, ...], now: float) -> bytes:
    helo = re.sub(r"[^\x21-\x7e]", "?", helo)[:255] or "unknown"
    date = format_datetime(datetime.fromtimestamp(now, timezone.utc))
    target = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    text = (
        f"Received: from {helo} ([{client_ip}])\r\n"
        f"\tby {hostname} (maildetour) with {protocol} id {queue_id}{target};\r\n"
        f"\t{date}\r\n"
    )
    return text.encode("utf-8", "replace")


def header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def count_received(data: bytes) -> int:
    return len(_RECEIVED.findall(header_block(data)))


def find_message_id(data: bytes) -> str:
    m = re.search(rb"^message-id:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", header_block(data), re.I | re.M)
    return m.group(1).decode("utf-8", "replace").replace("\r\n", "").strip()[:998] if m else ""


def has_bare_cr_or_lf(data: bytes) -> bool:
    """True for a CR not followed by LF or an LF not preceded by CR (SMTP smuggling)."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs
