"""The unit a per-client limit counts: one client address, or one IPv6 /64.

Pure. Used by the SMTP per-client limits (`inbound.limits`) and the POP3 login throttle
(`pop3.throttle`), so both count a client the same way.
"""

from __future__ import annotations

import ipaddress


def client_key(address: str) -> str:
    """An IPv4 address, or the /64 of an IPv6 address (one host usually owns a whole /64).
    IPv4-mapped IPv6 addresses count as IPv4; a zone index is dropped. Anything that is not an
    IP address (a Unix socket's name, "unknown") is its own key, verbatim."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)
