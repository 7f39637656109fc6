"""Typed configuration: frozen dataclasses, and every default and limit in one place.

Pure. `config.load` fills these from TOML; everything else reads only these objects.
Each limit says why it has its value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str = "localhost"  # greeting, Received, Message-ID, DSN
    state_dir: Path = Path("var")  # absolute after loading (relative to the config file)


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 2525),)
    domains: tuple[str, ...] = ()
    # Gmail's own limit; larger mail would be refused downstream anyway.
    max_message_size: int = 25 * MB
    # RFC 5321 6.3 suggests 100 hops as a loop limit; 50 is Postfix's hopcount_limit.
    max_received: int = 50
    # One small process: beyond this many clients at once, new ones get 421 and retry later.
    max_sessions: int = 100
    # RFC 5321 4.5.3.1.8: at least 100 recipients must be accepted.
    max_recipients: int = 100
    # RFC 5321 4.5.3.2.7: the server should wait at least 5 minutes for a command.
    command_timeout: float = 300.0
    # A whole DATA transfer may take this long as long as lines keep arriving (each line
    # resets the idle timer, which is command_timeout).
    data_timeout: float = 1800.0
    # RFC 5321 4.5.3.1.6 says 1000 octets per text line; real mail (generated HTML) exceeds
    # it now and then, and refusing it loses mail (Postfix takes 2048 and folds). We keep the
    # bytes unchanged (DKIM), so we take longer lines instead; longer still get 500 5.5.2.
    max_line_length: int = 8192
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True, slots=True)
class Pop3Config:
    listen: tuple[HostPort, ...] = ()
    listen_tls: tuple[HostPort, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Clear-text passwords outside loopback need TLS first unless this is set.
    allow_plaintext: bool = False


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    relay: dict[str, HostPort] = field(default_factory=dict)  # domain -> next hop (no MX lookup)
    dns_servers: tuple[HostPort, ...] = ()  # empty: the system resolver
    smtp_port: int = 25  # port of MX hosts (only tests and special setups change it)
    # A next hop that does not greet in 20 s is stalled (Postfix waits 300 s; we detour sooner).
    connect_timeout: float = 20.0
    command_timeout: float = 60.0
    data_timeout: float = 180.0
    max_connections_per_host: int = 10
    retry_first: float = 60.0  # first retry after a temporary failure
    retry_max: float = 3600.0  # backoff doubles up to this
    # Ordinary (non-hidden) copies still failing after this long are bounced (Postfix: 5d).
    max_lifetime: float = 5 * 86400.0
    tls: str = "opportunistic"  # "opportunistic" | "none"
    # Bytes of a message delivered to a hidden destination are kept this long, so a DSN that
    # arrives later (a late bounce) can still send the copy down its detour.
    late_bounce_window: float = 3 * 86400.0


@dataclass(frozen=True, slots=True)
class Mailbox:
    address: str  # lowercased
    password: str | None = None
    password_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Forward:
    pattern: str  # "user@d", or "@d" for catch-all; lowercased
    to: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Destination:
    address: str  # lowercased
    hidden: bool = False
    detour: str | None = None
    # Temporary failures this long detour too (the seed's "10m").
    detour_after: float = 600.0
    # Inbound verdicts that send a copy straight down the detour without trying this
    # destination: "spf-fail", "dkim-fail", "dmarc-fail" (see SKIP_CONDITIONS).
    skip_when: tuple[str, ...] = ()


SKIP_CONDITIONS = ("spf-fail", "spf-softfail", "dkim-fail", "dmarc-fail")


@dataclass(frozen=True, slots=True)
class SigningConfig:
    domain: str  # d= of DKIM and ARC, and the SRS domain
    selector: str
    dkim_key: Path
    srs_secret_file: Path
    ed25519_selector: str | None = None
    ed25519_key: Path | None = None  # base64 seed of an ed25519 key (RFC 8463), optional


@dataclass(frozen=True, slots=True)
class ChecksConfig:
    # SPF/DKIM/DMARC of received mail -> Authentication-Results. Default: on when [signing]
    # is configured (ARC needs the verdicts), off otherwise (like the seed's Postfix recipe).
    inbound: bool = False
    authserv_id: str = ""  # default: server.hostname
    # DNS budget of each check stage; a slow DNS gives temperror, never a stall.
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    server: ServerConfig
    smtp: SmtpConfig
    pop3: Pop3Config
    delivery: DeliveryConfig
    mailboxes: dict[str, Mailbox]
    forwards: tuple[Forward, ...]
    destinations: dict[str, Destination]
    signing: SigningConfig | None = None
    checks: ChecksConfig = ChecksConfig()

    @property
    def spool_dir(self) -> Path:
        return self.server.state_dir / "spool"

    @property
    def queue_db(self) -> Path:
        return self.server.state_dir / "queue.sqlite3"

    @property
    def audit_log(self) -> Path:
        return self.server.state_dir / "audit.jsonl"

    def mailbox_dir(self, address: str) -> Path:
        return self.server.state_dir / "mailboxes" / address.lower()
