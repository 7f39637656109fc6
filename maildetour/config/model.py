"""Typed configuration: frozen dataclasses, and every default and limit in one place.

Pure. `config.load` fills these from TOML; everything else reads only these objects (the
values shared with the pure core, `HostPort` and `Destination`, are defined there). Each limit
says why it has its value. Bounds that belong to a protocol or a parser rather than to an
operator (RFC line and address lengths, how many MX hosts we try, how big a DSN we parse) stay
next to their code as named constants.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from maildetour.core.destinations import Destination
from maildetour.core.hostport import HostPort
from maildetour.core.policy import RetryRules
from maildetour.core.routing import RoutingTable

MB = 1024 * 1024

# A destination's temporary failures this long detour too (the seed's "10m").
DEFAULT_DETOUR_AFTER = 600.0
# How copies travel to their next hop, weakest first (see delivery.tls_policy).
TLS_MODES = ("none", "opportunistic", "required", "verify")


# The event loops `[server] event_loop` may name: "auto" is uvloop when it can be imported, else
# asyncio's own (see `maildetour.eventloop`).
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
# `[server] workers` above this is surely a typo: each process holds its own store connection.
MAX_WORKERS = 64


def default_workers() -> int:
    """One process per core this process may run on (its CPU affinity, which a container's
    cpuset narrows; os.cpu_count() would count the whole machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str = "localhost"  # greeting, Received, Message-ID, DSN
    state_dir: Path = Path("var")  # absolute after loading (relative to the config file)
    # Processes: 1 is one process doing everything; N > 1 is the main process (queue, delivery,
    # POP3, metrics) and N - 1 SMTP intake workers (`intake_workers`). Python runs one core
    # per process, so the default uses every core.
    workers: int = field(default_factory=default_workers)
    event_loop: str = "auto"  # one of EVENT_LOOPS
    # This server's name among the nodes sharing a PostgreSQL store ([store] url): it holds the
    # leases of the copies it attempts. None: the machine's host name, the pid and a random
    # part, new at every start (leases of a previous run then simply run out). A name given
    # here is kept across restarts, and its leases from a previous run are released at start,
    # so it must be unique among the nodes.
    node: str | None = None


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
    # Declared sizes (SIZE=, else max_message_size) of the messages being received at once;
    # a DATA beyond it waits for room, then 452 4.3.1 (inbound.data_budget). Receiving holds
    # about three times this in memory at worst; one message always goes.
    max_bytes_receiving: int = 128 * MB
    # Bytes a second a DATA phase must average after its first 30 s (0: no floor), like
    # Postfix's smtpd_min_data_rate (500): a client trickling its message cannot hold a slot
    # of max_bytes_receiving for data_timeout. Then 421 4.4.2 and the connection closes.
    min_data_rate: int = 500
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # --- Per-client limits (inbound.limits). A client is an IPv4 address or an IPv6 /64. ---
    # Sessions at once from one client, like Postfix's smtpd_client_connection_count_limit (50
    # of its 100 processes). Not set: at most half of max_sessions, so that one client never
    # holds every slot (issue 10 #8). More get 421 4.7.0.
    max_sessions_per_client: int = 50
    # Commands in a row that move no transaction on (NOOP, RSET, HELP, VRFY, EXPN, EHLO again,
    # refused or malformed ones); an accepted MAIL, RCPT or DATA starts the count again. A
    # client needs a handful (EHLO, STARTTLS, EHLO, RSET); Postfix hangs up after 20 errors
    # (smtpd_hard_error_limit). Stops NOOP from keeping an idle session alive. Then 421.
    max_commands_without_progress: int = 20
    # A session's whole life, checked at each command: MTAs reuse a connection for minutes at
    # most (Postfix: smtp_connection_reuse_time_limit, 300 s); an hour bounds a client that
    # holds a slot with a command now and then, and no real queue run comes near it. Then 421.
    max_session_time: float = 3600.0
    # Refused recipients in one session before 421, like Postfix's smtpd_hard_error_limit:
    # guessing addresses or SRS hashes (issue 10 #4: 300 in 0.5 s) needs a new session per 20.
    max_refused_recipients: int = 20
    # Refused recipients from one client within refused_window; beyond, every RCPT gets 450
    # 4.7.1 without being looked up, so the answer tells nothing. A sender with a few stale
    # addresses stays far below; a dictionary attack gets 100 guesses an hour.
    max_refused_per_client: int = 100
    refused_window: float = 3600.0
    # Rates per minute (0: no limit), each a token bucket that allows a burst of the full
    # amount. A personal forwarder gets a few messages a minute from any one client or sender
    # domain; these stop a flood long before it fills the disk or makes Gmail throttle the
    # forwarded copies, while a mailing list burst or a retried queue passes. Connections over
    # the rate get 421 4.7.0, messages (at MAIL) and recipients (at RCPT) 450 4.7.1.
    client_connections_per_minute: int = 60
    client_messages_per_minute: int = 60
    client_recipients_per_minute: int = 200
    sender_domain_messages_per_minute: int = 120
    sender_domain_recipients_per_minute: int = 400
    # Networks the limits that count across sessions (sessions per client, the rates, refused
    # recipients per client) do not apply to: loopback, like Postfix's $mynetworks exceptions.
    # Only local programs connect from there (and the benchmark's smtp-source: 5,000 messages
    # over 20 sessions). Limits within one session apply to every client.
    unlimited_clients: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Clients and sender domains each rate table remembers; the least recently seen go first.
    max_tracked_clients: int = 10_000


@dataclass(frozen=True, slots=True)
class Pop3Settings:
    """Every limit and policy switch of the POP3 server; `__post_init__` rejects nonsense
    values with ValueError naming the field."""

    # RFC 2449 caps a command at 255 octets, but an AUTH PLAIN response carries a base64 user
    # name and password; 1024 fits any sane pair and still stops junk early.
    max_line_length: int = 1024
    # Enough to RETR and DELE 40,000 messages in one session; stops a client that loops.
    max_commands: int = 100_000
    # Unknown, malformed or wrong-state commands before we hang up: clients that speak POP3 make
    # a few mistakes at most (probing CAPA extensions); junk senders make many.
    max_bad_commands: int = 20
    # Failed logins in one session before we hang up (the per-address throttle is separate).
    max_login_failures: int = 3
    # RFC 1939 asks for an autologout timer of at least 10 minutes.
    idle_timeout: float = 600.0
    # Concurrent sessions over all listeners; more get "-ERR [SYS/TEMP]" and are closed.
    max_connections: int = 100
    # Clear-text USER/PASS and AUTH PLAIN are refused before TLS (RFC 2595), except from
    # loopback; `[pop3] allow_plaintext = true` sets this, only behind a trusted network (e.g.
    # a TLS-terminating proxy).
    allow_insecure_login: bool = False
    # Pause before answering a failed login: slows guessing within one session.
    failed_login_delay: float = 1.0
    # Throttle: failed logins from one client address (IPv6: its /64) within the window...
    max_failures_per_client: int = 10
    # ...and against one mailbox name from anywhere (higher: it also locks out the owner).
    max_failures_per_mailbox: int = 30
    # Sliding window for both throttles, in seconds.
    failure_window: float = 900.0
    # Addresses/mailboxes remembered by the throttle; the least recently failed are forgotten.
    max_tracked_failures: int = 10_000
    # Time allowed for a TLS handshake (implicit or after STLS).
    tls_handshake_timeout: float = 30.0
    # Connections not yet logged in from one client address (IPv6: its /64): a mail program
    # or fetcher opens one or two at a time; one address must not hold every slot (issue 10
    # #8: 100 idle connections from one address locked the owner out).
    max_unauthenticated_per_client: int = 10
    # Commands before a login that are not themselves a login attempt (CAPA, STLS, USER...):
    # a client needs about six (CAPA, STLS, CAPA, USER per attempt); CAPA every few minutes
    # must not keep a connection alive forever. Login attempts have their own limit above.
    max_commands_before_login: int = 20
    # From connect to a successful login, whatever the client does meanwhile: real clients
    # log in within seconds (TLS handshake, three failed logins with their delay included).
    login_timeout: float = 60.0
    # Whole session, logged in or not: a client that reads a byte now and then must not hold
    # the mailbox lock and a slot forever. Two hours fetch about 900 MB at 1 Mbit/s; a client
    # cut off logs in again and goes on by UIDL.
    max_session_time: float = 7200.0
    # Threads that hash passwords for logins (argon2id or scrypt), apart from every other pool:
    # each run is ~30-60 ms of CPU and 16-19 MiB (one core: argon2id with p=1); two use both
    # cores of a small host at most and leave SMTP responsive.
    password_workers: int = 2
    # Threads for Maildir reads, listings and removals of POP3 sessions, apart from the shared
    # default pool (spool writes, local delivery), so neither can stall the other.
    io_workers: int = 4

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool):
                continue
            if value <= 0 and item.name != "failed_login_delay" or value < 0:
                raise ValueError(f"pop3 setting {item.name} must be positive, got {value!r}")
        if self.max_line_length < 64:
            raise ValueError("pop3 setting max_line_length must be at least 64")


@dataclass(frozen=True, slots=True)
class Pop3Config:
    listen: tuple[HostPort, ...] = ()
    listen_tls: tuple[HostPort, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    settings: Pop3Settings = Pop3Settings()
    # A Dovecot passwd-file (`user:{ARGON2ID}...:...`) the mailboxes' passwords come from, read
    # at start and on reload: one list for our POP3 and Dovecot's IMAP (issue 12).
    passwd_file: Path | None = None


# `[delivery] lmtp = "unix:PATH"`: a Unix socket (Dovecot's is /run/dovecot/lmtp); else host:port.
LMTP_UNIX_PREFIX = "unix:"


@dataclass(frozen=True, slots=True)
class LmtpServer:
    """The mail store every `[mailbox]` copy is handed to by LMTP (RFC 2033), instead of our
    own Maildirs: a TCP `address` or a Unix `socket`, exactly one of them."""

    address: HostPort | None = None
    socket: Path | None = None

    def __str__(self) -> str:
        return f"{LMTP_UNIX_PREFIX}{self.socket}" if self.socket is not None else str(self.address)


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
    # TLS to next hops (see delivery.tls_policy): "none", "opportunistic", "required" (encrypt,
    # certificate not checked) or "verify" (encrypt, certificate valid for the MX name).
    tls: str = "opportunistic"
    tls_policy: dict[str, str] = field(default_factory=dict)  # domain -> mode, beats `tls`
    tls_ca_file: Path | None = None  # CAs for "verify" and MTA-STS fetches (default: the system's)
    # Honour the MTA-STS policies (RFC 8461) domains publish: "enforce" makes delivery "verify"
    # and limits it to the MX hosts the policy names; a copy that cannot meet that waits.
    mta_sts: bool = True
    mta_sts_port: int = 443  # HTTPS port of mta-sts.<domain> (only tests change it)
    # Bytes of a message delivered to a hidden destination are kept this long, so a DSN that
    # arrives later (a late bounce) can still send the copy down its detour.
    late_bounce_window: float = 3 * 86400.0
    # How often kept bytes past their window are removed.
    purge_interval: float = 3600.0
    # Least time between two deliveries to one destination (a recipient domain, an IMAP
    # account), like Postfix's default_destination_rate_delay: 0 sends as fast as it can. When
    # a destination says we send too fast (Gmail's 4.7.28, 4.2.1), the whole destination waits
    # retry_first, doubling while it keeps saying so (up to retry_max), whatever this is.
    destination_rate_delay: float = 0.0
    # Attempts in flight at once, over all next hops (each host also has its own limit): a
    # drained backlog of 100,000 due copies must not become 100,000 tasks at once.
    max_parallel_attempts: int = 200
    # Attempts in flight hold their message's bytes (and a signed copy): at most this many bytes
    # of messages at once, so 200 attempts of 25 MB messages cannot take 10 GB. One attempt
    # always goes, whatever its size; the rest wait in the queue.
    max_bytes_in_flight: int = 256 * MB
    # An idle SMTP connection is kept this long for the next message to the same host: enough
    # for a burst, well under the 300 s a server waits for a command (RFC 5321 4.5.3.2.7).
    connection_idle_timeout: float = 5.0
    # Message bytes kept in memory between acceptance and the first attempts (and re-read
    # ones between copies of one message): at most this many bytes, each at most
    # `message_cache_seconds` after its last use; the rest is read from the spool again.
    message_cache: int = 8 * MB
    message_cache_seconds: float = 2.0
    # None: mailboxes are our own Maildirs (one node). Else every mailbox copy goes by LMTP to
    # this mail store (several nodes: a node must not keep mail the others cannot serve); it
    # uses connect_timeout, command_timeout, data_timeout, max_connections_per_host and
    # connection_idle_timeout above, like an SMTP next hop.
    lmtp: LmtpServer | None = None

    @property
    def retry(self) -> RetryRules:
        return RetryRules(self.retry_first, self.retry_max, self.max_lifetime)


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
class SigningConfig:
    domain: str  # d= of DKIM and ARC (and the SRS domain unless [srs] says otherwise)
    selector: str
    dkim_key: Path
    ed25519_selector: str | None = None
    ed25519_key: Path | None = None  # base64 seed of an ed25519 key (RFC 8463), optional


# The SRS secret made at the first start when none is configured, in state_dir.
SRS_SECRET_NAME = "srs.secret"
# Characters of the hash in our SRS addresses, and the fewest we accept in a bounce address:
# compared without case, 8 base64 characters are about 2^40 guesses for a forger (libsrs2's 4
# are 2^20). Set it to 4 only to share the secret with a postsrsd that makes 4.
SRS_HASH_LENGTH = 8


@dataclass(frozen=True, slots=True)
class SrsConfig:
    """SRS on every copy that leaves by SMTP: always on when we have a domain to use."""

    domain: str  # [srs].domain, else [signing].domain, else the first of smtp.domains
    secret_file: Path  # one secret a line (postsrsd's format): the first signs, all verify
    made_here: bool  # no secret_file configured: state_dir/srs.secret, created at first start
    hash_length: int = SRS_HASH_LENGTH


# IMAP ports (RFC 8314: implicit TLS on 993; STARTTLS on 143).
IMAP_PORTS = {"implicit": 993, "starttls": 143}
# Connect, log in, and each command (an APPEND of a big message included) within this.
IMAP_TIMEOUT = 30.0
# An idle kept connection sends NOOP this often: below common NAT idle timeouts (5 min and up)
# and far below a server's autologout (RFC 3501 5.4: at least 30 min).
IMAP_KEEPALIVE = 240.0
# Authenticated connections kept open to one account (one APPEND at a time on each): one is
# enough for a personal forwarder; Gmail allows 15 per account.
IMAP_CONNECTIONS = 1


@dataclass(frozen=True, slots=True)
class ImapAccount:
    """An account a detour step appends into (`detour = ["imap:NAME", ...]`)."""

    name: str
    host: str
    port: int
    tls: str  # "implicit" (993) | "starttls" (143); the certificate is always verified
    user: str
    timeout: float  # connect, log in, and each command, within this (IMAP_TIMEOUT)
    connections: int  # authenticated connections kept open (IMAP_CONNECTIONS)
    folder: str = "INBOX"
    auth: str = "password"  # "password" (LOGIN) | "xoauth2" (SASL XOAUTH2 with a bearer token)
    password_file: Path | None = None  # the first line is the password
    password_command: str | None = None  # run by /bin/sh; the first line of its output
    token_command: str | None = None  # xoauth2: prints a current access token (first line)
    ca_file: Path | None = None  # CA bundle to verify the server with (default: the system's)


@dataclass(frozen=True, slots=True)
class ChecksConfig:
    # SPF/DKIM/DMARC of received mail -> Authentication-Results. Default: on when [signing]
    # is configured (ARC needs the verdicts), off otherwise (like the seed's Postfix recipe).
    inbound: bool = False
    authserv_id: str = ""  # default: server.hostname
    # One deadline per message for all its checks (SPF, DKIM, DMARC side by side): what is not
    # known by then is temperror and the message goes on. A slow DNS of one sender delays only
    # its own message (issue 10 #6); 5 s is well past a healthy lookup chain (tens of ms).
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # The Prometheus/OpenMetrics endpoint (/metrics, /healthz, /readyz). None: no endpoint at
    # all; what it shows is operator-facing (queue ages, destination names), so it is off
    # unless configured, and meant for loopback or a private network.
    listen: HostPort | None = None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """How long the queue database and the spool keep what is done (store.retention)."""

    # Finished messages (every copy delivered, bounced, failed or deleted): their rows, events
    # and spool file go this long after the last copy became final. A month of `trace` answers
    # "what happened to my mail last week" and bounds the database (None, "0": for ever).
    retention: float | None = 30 * 86400.0
    # Quarantined copies wait for the operator (`queue --release`) this long, then are deleted
    # (never delivered; kept for `trace` another `retention`). A loop can be made by anyone,
    # so quarantine must not grow for ever; three months is time to notice (None, "0": for ever).
    quarantine_retention: float | None = 90 * 86400.0
    # How often the sweep looks for what is due. Each sweep works in batches of `purge_batch`
    # messages per transaction (tens of milliseconds), so accepting and delivering never wait long.
    sweep_interval: float = 600.0
    purge_batch: int = 500
    # The queue in PostgreSQL ("postgresql://user@host/db"; libpq's URL or key=value string),
    # shared by every node that names it; None: SQLite in the state dir (one node).
    url: str | None = None
    # How long a node's claim on a copy lasts unless renewed (every lease/3, with the node's
    # heartbeat): a node that dies leaves its copies to the others after at most this long
    # (plus a third of it). Longer than a database restart, so a short outage costs no second
    # delivery; short enough that a dead node's mail waits little.
    lease: float = 60.0
    # Connections per node to PostgreSQL: enough for the SMTP sessions committing and the
    # attempts reporting at once (each transaction holds one for about a millisecond); the
    # server's max_connections must cover every node's.
    connections: int = 10


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
    srs: SrsConfig | None = None  # None only when there is no domain at all to use
    imap: dict[str, ImapAccount] = field(default_factory=dict)
    metrics: MetricsConfig = MetricsConfig()
    store: StoreConfig = StoreConfig()

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

    def routing_table(self) -> RoutingTable:
        mailboxes = frozenset(self.mailboxes)
        domains = frozenset(self.smtp.domains) | {a.split("@", 1)[1] for a in mailboxes}
        forwards = {rule.pattern: rule.to for rule in self.forwards}
        return RoutingTable(domains, mailboxes, forwards, dict(self.destinations))
