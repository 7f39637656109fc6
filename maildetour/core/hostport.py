"""A host and port to listen on or to connect to.

Pure value. For a next hop, `name` is what it was found under (the MX or relay name, or the
IP literal itself), for TLS server names and logs; listen addresses leave it empty.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str  # IP literal (or a host name in the config, resolved before dialling)
    port: int
    name: str = ""

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
